"""Tests of alp_megatron/data/prompts.py and readers.py: JSONL and Parquet prompt datasets and their row errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alp_megatron.data.prompts import PromptDataConfig, PromptDataset
from alp_megatron.data.readers import DataError
from alp_megatron.errors import ConfigError
from alp_megatron.model.tiny import build_char_tokenizer

# One token per character (the char tokenizer knows lowercase letters, digits and a few signs, not ':' or '\n').
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }} {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant {% endif %}"
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, lines):
    """Writes each item as a line: dicts as JSON, strings verbatim (for broken lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def ids(tokenizer, text, special=True):
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_jsonl_plain_text_prompts(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "what is 2+3?", "label": "5", "level": 1},
        "",  # blank lines are skipped but counted
        {"prompt": "what is 7*6?", "label": 42, "source": "x", "tags": ["a"]},
    ])
    dataset = PromptDataset(PromptDataConfig(paths=(path,), apply_chat_template=False), plain_tokenizer)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first.prompt_text == "what is 2+3?"
    assert first.prompt_ids == ids(plain_tokenizer, "what is 2+3?")
    assert (first.label, first.metadata, first.index, first.source, first.row) == ("5", {"level": 1}, 0, path, 1)
    assert (second.label, second.metadata, second.index, second.row) == (42, {"source": "x", "tags": ["a"]}, 1, 3)
    assert dataset[-1] == second


def test_jsonl_chat_messages_rendered_through_the_template(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"question": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1+1?"}],
         "answer": "2"},
        {"question": "what is 2+2?", "answer": "4"},  # a string prompt becomes one user message
    ])
    config = PromptDataConfig(paths=(path,), prompt_field="question", label_field="answer")
    dataset = PromptDataset(config, chat_tokenizer)
    first, second = dataset[0], dataset[1]
    assert first.prompt_text == "<bos>system be brief<eos><bos>user what is 1+1?<eos><bos>assistant "
    assert second.prompt_text == "<bos>user what is 2+2?<eos><bos>assistant "
    assert first.prompt_ids == ids(chat_tokenizer, first.prompt_text, special=False)
    assert first.prompt_ids[0] == chat_tokenizer.bos_token_id
    assert first.prompt_ids.count(chat_tokenizer.eos_token_id) == 2  # "<eos>" is one special token, not 5 chars
    assert (first.label, second.label, first.metadata) == ("2", "4", {})


def test_string_prompts_are_plain_text_when_the_tokenizer_has_no_template(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc", "label": "x"}])
    dataset = PromptDataset(PromptDataConfig(paths=(path,), apply_chat_template=True), plain_tokenizer)
    assert dataset[0].prompt_text == "abc"


def test_parquet_files_and_indices_across_files(tmp_path, chat_tokenizer):
    strings = write_parquet(tmp_path / "a.parquet", [
        {"prompt": "one", "label": 1.5, "extra": "e1"},
        {"prompt": "two", "label": 2.5, "extra": "e2"},
    ])
    chats = write_parquet(tmp_path / "b.parquet", [
        {"prompt": [{"role": "user", "content": "three"}], "label": 3.5, "extra": "e3"},
    ])
    dataset = PromptDataset(PromptDataConfig(paths=(strings, chats)), chat_tokenizer)
    assert len(dataset) == 3
    rows = [(p.index, p.source, p.row, p.label, p.metadata["extra"]) for p in (dataset[i] for i in range(3))]
    assert rows == [(0, strings, 1, 1.5, "e1"), (1, strings, 2, 2.5, "e2"), (2, chats, 1, 3.5, "e3")]
    assert dataset[2].prompt_text == "<bos>user three<eos><bos>assistant "
    assert dataset[0].prompt_text == "<bos>user one<eos><bos>assistant "


def test_no_label_field(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abc", "label": "kept as metadata"}])
    dataset = PromptDataset(PromptDataConfig(paths=(path,), label_field=None), plain_tokenizer)
    assert dataset[0].label is None
    assert dataset[0].metadata == {"label": "kept as metadata"}


GOOD = {"prompt": "good row", "label": "1"}


@pytest.mark.parametrize(
    "bad_line, field, problem",
    [
        ('{"prompt": "unterminated', None, "invalid JSON"),
        ('["prompt", "label"]', None, "JSON list, not an object"),
        ({"promt": "typo", "label": "1"}, "prompt", "no such field (its fields: label, promt)"),
        ({"prompt": "no label"}, "label", "no such field"),
        ({"prompt": "null label", "label": None}, "label", "the label is null"),
        ({"prompt": 5, "label": "1"}, "prompt", "must be a string or a list of chat messages, got int"),
        ({"prompt": None, "label": "1"}, "prompt", "got null"),
        ({"prompt": "   ", "label": "1"}, "prompt", "the prompt is empty"),
        # 40 characters + 18 tokens of chat template ("<bos>user ", "<eos>", "<bos>assistant ")
        ({"prompt": "x" * 40, "label": "1"}, "prompt", "the prompt is 58 tokens, more than data.max_prompt_tokens=32"),
        ({"prompt": [], "label": "1"}, "prompt", "the message list is empty"),
        ({"prompt": [{"role": "user"}], "label": "1"}, "prompt[0].content", "must be a string, got no such key"),
        ({"prompt": [{"role": "user", "content": "hi"}, "hi"], "label": "1"}, "prompt[1]", "must be an object"),
        ({"prompt": [{"role": 1, "content": "hi"}], "label": "1"}, "prompt[0].role", "must be a string, got int"),
        ({"prompt": [{"role": "user", "content": " "}], "label": "1"}, "prompt", "every message's content is empty"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, chat_tokenizer, bad_line, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as info:
        PromptDataset(PromptDataConfig(paths=(path,), max_prompt_tokens=32), chat_tokenizer)
    error = info.value
    assert (error.path, error.row, error.field) == (path, 3, field)
    message = str(error)
    assert message.startswith(f"{path}, line 3" + (f", field '{field}'" if field else "") + ": ")
    assert problem in message
    assert "Fix: " in message and error.fix


def test_chat_messages_without_a_template_are_an_error(tmp_path, plain_tokenizer, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"prompt": [{"role": "user", "content": "hi"}], "label": "1"}])
    with pytest.raises(DataError, match="the tokenizer has no chat template") as info:
        PromptDataset(PromptDataConfig(paths=(path,)), plain_tokenizer)
    assert (info.value.row, info.value.field) == (2, "prompt")
    with pytest.raises(DataError, match="data.apply_chat_template is false"):
        PromptDataset(PromptDataConfig(paths=(path,), apply_chat_template=False), chat_tokenizer)


def test_a_failing_chat_template_names_the_row(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] != 'user' %}" \
        "{{ raise_exception('only user messages') }}{% endif %}{{ m['content'] }}{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"prompt": [{"role": "tool", "content": "hi"}], "label": "1"}])
    with pytest.raises(DataError, match="the chat template failed.*only user messages") as info:
        PromptDataset(PromptDataConfig(paths=(path,)), tokenizer)
    assert (info.value.row, info.value.field) == (2, "prompt")


def test_bad_parquet_rows_name_file_row_and_field(tmp_path, plain_tokenizer):
    path = write_parquet(tmp_path / "bad.parquet", [GOOD, {"prompt": None, "label": "1"}])
    with pytest.raises(DataError) as info:
        PromptDataset(PromptDataConfig(paths=(path,)), plain_tokenizer)
    assert (info.value.path, info.value.row, info.value.field) == (path, 2, "prompt")
    assert str(info.value).startswith(f"{path}, row 2, field 'prompt': ")

    long_rows = write_parquet(tmp_path / "long.parquet", [GOOD, GOOD, {"prompt": "y" * 20, "label": "1"}])
    with pytest.raises(DataError, match="20 tokens, more than data.max_prompt_tokens=10") as info:
        PromptDataset(PromptDataConfig(paths=(long_rows,), max_prompt_tokens=10), plain_tokenizer)
    assert (info.value.row, info.value.field) == (3, "prompt")


def test_missing_parquet_column_lists_the_columns(tmp_path, plain_tokenizer):
    path = write_parquet(tmp_path / "cols.parquet", [{"question": "q", "label": "1"}])
    with pytest.raises(DataError, match=r"no such column \(the columns are question, label\)") as info:
        PromptDataset(PromptDataConfig(paths=(path,)), plain_tokenizer)
    assert (info.value.path, info.value.row, info.value.field) == (path, None, "prompt")
    assert "data.prompt_field" in str(info.value)


def test_unreadable_parquet_and_empty_files(tmp_path, plain_tokenizer):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        PromptDataset(PromptDataConfig(paths=(str(broken),)), plain_tokenizer)
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="holds no rows"):
        PromptDataset(PromptDataConfig(paths=(empty,)), plain_tokenizer)


def test_missing_file_names_the_config_field(tmp_path, plain_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as info:
        PromptDataset(PromptDataConfig(paths=(good, missing)), plain_tokenizer)
    assert info.value.field == "data.paths[1]" and missing in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"paths": ()}, "data.paths"),
        ({"paths": ("a.csv",)}, "data.paths[0]"),
        ({"paths": ("a.jsonl", 3)}, "data.paths[1]"),
        ({"paths": ("a.jsonl",), "prompt_field": ""}, "data.prompt_field"),
        ({"paths": ("a.jsonl",), "label_field": "prompt"}, "data.label_field"),
        ({"paths": ("a.jsonl",), "max_prompt_tokens": 0}, "data.max_prompt_tokens"),
        ({"paths": ("a.jsonl",), "apply_chat_template": "yes"}, "data.apply_chat_template"),
        ({"paths": ("a.jsonl",), "seed": -1}, "data.seed"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        PromptDataConfig(**kwargs)
    assert info.value.field == field
