"""Tests of alp_megatron/data/toy.py: the toy-task prompts of the embedded demo."""

import pytest

from alp_megatron.data.batches import DataPosition
from alp_megatron.data.toy import TOY_TASKS, ToyTaskPrompts, tool_trace, toy_prompt_batches, toy_task
from alp_megatron.errors import ConfigError
from alp_megatron.model.tiny import build_char_tokenizer
from alp_megatron.rewards.base import BUILTIN_REWARDS, load_reward_function


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("task, size", [("add1", 100), ("sub1", 55), ("rev4", 10_000)])
def test_tasks_enumerate_every_distinct_prompt(tokenizer, task, size):
    prompts = ToyTaskPrompts(task, tokenizer)
    assert len(prompts) == size
    assert len({prompts[i].prompt_text for i in range(size)}) == size


def by_text(prompts):
    return {prompts[i].prompt_text: prompts[i] for i in range(len(prompts))}


def test_labels_hand_checked(tokenizer):
    add1, sub1, rev4 = (by_text(ToyTaskPrompts(t, tokenizer)) for t in ("add1", "sub1", "rev4"))
    assert add1["3+5="].label == "8" and add1["9+6="].label == "15" and add1["0+0="].label == "0"
    assert sub1["8-3="].label == "5" and sub1["7-7="].label == "0" and "3-8=" not in sub1
    assert rev4["1234="].label == "4321" and rev4["0012="].label == "2100"


def test_prompt_ids_are_bos_then_one_token_per_character(tokenizer):
    prompt = by_text(ToyTaskPrompts("rev4", tokenizer))["1234="]
    # <bos>=1; digits '0'..'9' are 3..12, so '1'=4 ... '4'=7; '='=15
    assert prompt.prompt_ids == (1, 4, 5, 6, 7, 15)
    assert tokenizer.decode(list(prompt.prompt_ids)) == "<bos>1234="
    assert prompt.metadata == {"task": "rev4"} and prompt.source == "toy:rev4"


def test_each_task_reward_scores_its_own_answer(tokenizer):
    from alp_megatron.rollout.tools import SimpleTIRFormat, ToolResult

    for name, task in TOY_TASKS.items():
        assert task.reward in BUILTIN_REWARDS
        reward = load_reward_function(task.reward)
        prompt = ToyTaskPrompts(name, tokenizer)[17]
        answer = prompt.label
        if task.tool:  # a whole trajectory: code, the tool's output, the boxed answer
            observe = SimpleTIRFormat().observation
            answer = "".join(text for text, _ in tool_trace(prompt.prompt_text, prompt.label,
                                                            lambda out: observe(ToolResult(out))))
            assert reward(prompt.prompt_text, prompt.label + "<eos>", prompt.label, prompt.metadata) == 0.0
        assert reward(prompt.prompt_text, answer + "<eos>", prompt.label, prompt.metadata) == 1.0
        assert len(answer) + 1 <= task.max_new_tokens  # the answer and <eos> fit


def test_a_tool_trace_writes_the_code_reads_the_output_and_boxes_it():
    from alp_megatron.model.tiny import ASCII_CHARACTERS

    segments = tool_trace("12*34=", "408", lambda out: f"[{out}]")
    assert segments == [("```\nprint(12*34)\n```", True), ("[408\n]", False), ("\\boxed{408}", True)]
    assert toy_task("mul2").characters == ASCII_CHARACTERS and toy_task("rev4").characters != ASCII_CHARACTERS


def test_stream_is_fixed_by_the_seed_and_resumes(tokenizer):
    def take(batches, n):
        return [[p.prompt_text for p in batches.next_batch()] for _ in range(n)]

    reference = take(toy_prompt_batches("add1", 32, seed=3, tokenizer=tokenizer), 6)  # 192 prompts: 2 epochs
    assert take(toy_prompt_batches("add1", 32, seed=3, tokenizer=tokenizer), 6) == reference
    assert take(toy_prompt_batches("add1", 32, seed=4, tokenizer=tokenizer), 6) != reference

    first = toy_prompt_batches("add1", 32, seed=3, tokenizer=tokenizer)
    take(first, 4)
    saved = first.state_dict()
    assert saved == {"epoch": 1, "index": 28, "seed": 3, "num_prompts": 100}
    resumed = toy_prompt_batches("add1", 32, tokenizer=tokenizer, position=DataPosition.from_dict(saved))
    assert take(resumed, 2) == reference[4:]


def test_unknown_task_lists_the_choices():
    with pytest.raises(ConfigError, match="add1, sub1, rev4") as info:
        toy_task("rev5")
    assert info.value.field == "data.toy_task"


def test_a_tokenizer_without_the_characters_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "?": 1, "1": 2}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    small = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", unk_token="?")
    with pytest.raises(ConfigError, match="one known token per character"):
        ToyTaskPrompts("add1", small)
