"""Prompt datasets from JSONL and Parquet files, validated and tokenized when loaded.

Each row holds a prompt (``data.prompt_field``) and, unless ``data.label_field`` is null, a label (the answer a
reward function compares against: any JSON value). The prompt is either a string or a list of chat messages
``[{"role": ..., "content": ...}]``. With ``data.apply_chat_template`` and a tokenizer that has a chat template,
both forms are rendered through it (a string becomes one user message) with the generation prompt appended;
otherwise a string is used as plain text (encoded with the tokenizer's own special tokens), and a message list is
an error. The row's other fields become its metadata.

Every row is checked when the dataset is built, so a bad row stops the run at start with its file, row (the 1-based
line of a JSONL file) and field named: invalid JSON, a missing or null field, a prompt of the wrong type, an empty
prompt, or a prompt longer than ``data.max_prompt_tokens``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from alp_megatron.data.readers import SUPPORTED_SUFFIXES, DataError, parquet_columns, read_rows
from alp_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

ENCODE_CHUNK = 1024  # rows tokenized per call: batching is several times faster than one call a row


@dataclass(frozen=True)
class Prompt:
    """One prompt, ready for rollout.

    ``index`` is its position in the dataset (0-based, files in the order given); ``source`` and ``row`` say where
    it came from (``row`` is the 1-based JSONL line or Parquet row).
    """

    prompt_ids: Tuple[int, ...]
    prompt_text: str
    label: Any
    metadata: Mapping[str, Any]
    index: int
    source: str
    row: int


@dataclass(frozen=True)
class PromptDataConfig:
    """Where the prompts are and how to read them (the ``data`` section of a run config)."""

    paths: Tuple[str, ...]
    prompt_field: str = "prompt"
    label_field: Optional[str] = "label"
    apply_chat_template: bool = True
    max_prompt_tokens: int = 2048
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else self.paths
        if not isinstance(paths, (list, tuple)) or not paths:
            raise ConfigError("data.paths", f"must be a non-empty list of files, got {self.paths!r}",
                              "list one or more .jsonl or .parquet files")
        for i, path in enumerate(paths):
            if not isinstance(path, str) or not path:
                raise ConfigError(f"data.paths[{i}]", f"must be a file path, got {path!r}", "give a path string")
            if os.path.splitext(path)[1].lower() not in SUPPORTED_SUFFIXES:
                raise ConfigError(f"data.paths[{i}]", f"{path!r} is neither JSONL nor Parquet",
                                  f"use a file ending in one of {', '.join(SUPPORTED_SUFFIXES)}")
        object.__setattr__(self, "paths", tuple(paths))
        if not isinstance(self.prompt_field, str) or not self.prompt_field:
            raise ConfigError("data.prompt_field", f"must be a non-empty field name, got {self.prompt_field!r}",
                              "name the row field that holds the prompt, e.g. 'prompt'")
        if self.label_field is not None and (not isinstance(self.label_field, str) or not self.label_field):
            raise ConfigError("data.label_field", f"must be a field name or null, got {self.label_field!r}",
                              "name the row field that holds the answer, e.g. 'label', or null for no labels")
        if self.label_field == self.prompt_field:
            raise ConfigError("data.label_field", f"is the same field as data.prompt_field ({self.prompt_field!r})",
                              "point the two at different row fields")
        for name in ("apply_chat_template", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"data.{name}", f"must be true or false, got {getattr(self, name)!r}",
                                  "use true or false")
        if isinstance(self.max_prompt_tokens, bool) or not isinstance(self.max_prompt_tokens, int) \
                or self.max_prompt_tokens < 1:
            raise ConfigError("data.max_prompt_tokens", f"must be an integer >= 1, got {self.max_prompt_tokens!r}",
                              "use the longest prompt (in tokens) the rollout may take, e.g. 2048")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("data.seed", f"must be an integer >= 0, got {self.seed!r}", "use e.g. 0")


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _checked_messages(value: list, path: str, row: int, name: str) -> List[Dict[str, str]]:
    if not value:
        raise DataError(path, row, name, "the message list is empty", "give at least one {role, content} message")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(path, row, f"{name}[{i}]", f"a message must be an object, got {type(message).__name__}",
                            "write each message as {\"role\": \"user\", \"content\": \"...\"}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "no such key" if key not in message else type(message[key]).__name__
                raise DataError(path, row, f"{name}[{i}].{key}", f"must be a string, got {got}",
                                "write each message as {\"role\": \"user\", \"content\": \"...\"}")
        if not message["role"]:
            raise DataError(path, row, f"{name}[{i}].role", "is empty", "use a role such as 'system' or 'user'")
    if not any(message["content"].strip() for message in value):
        raise DataError(path, row, name, "every message's content is empty", "put the prompt in a message's content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


class _Renderer:
    """Turns a row's prompt value into text, and says whether the text already holds the special tokens."""

    def __init__(self, config: PromptDataConfig, tokenizer):
        self.tokenizer = tokenizer
        self.field = config.prompt_field
        self.use_template = config.apply_chat_template and has_chat_template(tokenizer)
        if config.apply_chat_template and not self.use_template:
            logger.warning("data.apply_chat_template is set but the tokenizer has no chat template: "
                           "string prompts are used as plain text")
        self.no_template_reason = (
            "data.apply_chat_template is false" if not config.apply_chat_template
            else "the tokenizer has no chat template"
        )

    def render(self, value: Any, path: str, row: int) -> Tuple[str, bool]:
        if isinstance(value, str):
            if not value.strip():
                raise DataError(path, row, self.field, "the prompt is empty", "give a non-empty prompt or drop the row")
            if not self.use_template:
                return value, False
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list):
            messages = _checked_messages(value, path, row, self.field)
            if not self.use_template:
                raise DataError(
                    path, row, self.field, f"the prompt is a list of chat messages but {self.no_template_reason}",
                    "set data.apply_chat_template: true with a tokenizer that has a chat template, "
                    "or give the prompt as a string",
                )
        else:
            got = "null" if value is None else type(value).__name__
            raise DataError(path, row, self.field, f"the prompt must be a string or a list of chat messages, got {got}",
                            "store the prompt as text or as [{\"role\": \"user\", \"content\": \"...\"}]")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:
            raise DataError(path, row, self.field, f"the chat template failed: {type(error).__name__}: {error}",
                            "check the message roles this tokenizer's template accepts") from error
        return text, True


@dataclass
class _PendingRow:
    row: int
    text: str
    templated: bool
    label: Any
    metadata: Dict[str, Any]


@dataclass
class _Columns:
    """The loaded prompts, column by column (token ids as int32 arrays to keep large datasets small)."""

    ids: List[np.ndarray] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    labels: List[Any] = field(default_factory=list)
    metadata: List[Dict[str, Any]] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    rows: List[int] = field(default_factory=list)


class PromptDataset:
    """The prompts of ``config.paths``, all checked and tokenized on construction; indexable, ``len()``-able.

    ``tokenizer`` is a Hugging Face tokenizer (``__call__``, ``apply_chat_template``, ``chat_template``).
    """

    def __init__(self, config: PromptDataConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self._renderer = _Renderer(config, tokenizer)
        self._columns = _Columns()
        for i, path in enumerate(config.paths):
            if not os.path.isfile(path):
                raise ConfigError(f"data.paths[{i}]", f"{path!r} does not exist or is not a file",
                                  "check the path (relative paths start at the working directory)")
            before = len(self._columns.texts)
            self._load_file(path)
            if len(self._columns.texts) == before:
                raise DataError(path, None, None, "the file holds no rows", "fill it, or remove it from data.paths")

    def __len__(self) -> int:
        return len(self._columns.texts)

    def __getitem__(self, index: int) -> Prompt:
        c = self._columns
        return Prompt(prompt_ids=tuple(c.ids[index].tolist()), prompt_text=c.texts[index], label=c.labels[index],
                      metadata=c.metadata[index], index=index if index >= 0 else len(self) + index,
                      source=c.sources[index], row=c.rows[index])

    def _check_columns(self, path: str) -> None:
        if not path.lower().endswith(".parquet"):
            return
        columns = parquet_columns(path)
        if columns is None:
            return  # unreadable: reading the rows reports it
        for name, setting in ((self.config.prompt_field, "data.prompt_field"), (self.config.label_field,
                                                                                "data.label_field")):
            if name is not None and name not in columns:
                raise DataError(path, None, name, f"no such column (the columns are {', '.join(columns)})",
                                f"add the column, or set {setting} to the column that holds it")

    def _load_file(self, path: str) -> None:
        self._check_columns(path)
        pending: List[_PendingRow] = []
        for row, record in read_rows(path):
            pending.append(self._pending_row(path, row, record))
            if len(pending) >= ENCODE_CHUNK:
                self._encode(path, pending)
                pending = []
        self._encode(path, pending)

    def _pending_row(self, path: str, row: int, record: Dict[str, Any]) -> _PendingRow:
        prompt_field, label_field = self.config.prompt_field, self.config.label_field
        for name, setting in ((prompt_field, "data.prompt_field"), (label_field, "data.label_field")):
            if name is None:
                continue
            if name not in record:
                fields = ", ".join(sorted(map(str, record))) or "none"
                raise DataError(path, row, name, f"the row has no such field (its fields: {fields})",
                                f"add the field to every row, or set {setting} to the field that holds it")
            if record[name] is None and name == label_field:
                raise DataError(path, row, name, "the label is null",
                                "give every row its answer, or set data.label_field: null if the task has no labels")
        text, templated = self._renderer.render(record[prompt_field], path, row)
        label = record[label_field] if label_field is not None else None
        metadata = {k: v for k, v in record.items() if k not in (prompt_field, label_field)}
        return _PendingRow(row=row, text=text, templated=templated, label=label, metadata=metadata)

    def _encode(self, path: str, pending: Sequence[_PendingRow]) -> None:
        ids_by_row: Dict[int, List[int]] = {}
        for templated in (False, True):
            group = [p for p in pending if p.templated == templated]
            if group:
                # Rendered chat text already holds the template's special tokens; plain text gets the tokenizer's.
                encoded = self.tokenizer([p.text for p in group], add_special_tokens=not templated)["input_ids"]
                ids_by_row.update((p.row, ids) for p, ids in zip(group, encoded))
        limit = self.config.max_prompt_tokens
        c = self._columns
        for p in pending:
            ids = ids_by_row[p.row]
            if not ids:
                raise DataError(path, p.row, self.config.prompt_field, "the prompt encodes to no tokens",
                                "give a non-empty prompt or drop the row")
            if len(ids) > limit:
                raise DataError(path, p.row, self.config.prompt_field,
                                f"the prompt is {len(ids)} tokens, more than data.max_prompt_tokens={limit}",
                                "shorten the prompt or drop the row, or raise data.max_prompt_tokens")
            c.ids.append(np.asarray(ids, dtype=np.int32))
            c.texts.append(p.text)
            c.labels.append(p.label)
            c.metadata.append(p.metadata)
            c.sources.append(path)
            c.rows.append(p.row)
