"""Prompts of the toy tasks the embedded CPU demo trains on (measured in notes/demo-task-on-cpu.md).

- ``add1``: single-digit addition, ``"3+5="`` -> ``"8"``, ``"9+6="`` -> ``"15"`` (100 prompts; exact-match reward).
- ``sub1``: single-digit subtraction with a >= b, ``"8-3="`` -> ``"5"`` (55 prompts; exact-match reward).
- ``rev4``: reverse four digits, ``"1234="`` -> ``"4321"``, leading zeros included (10,000 prompts; positional
  partial reward).
- ``mul2``: two-digit multiplication with a Python tool, ``"12*34="`` -> ``"408"`` (8,100 prompts; multi-turn:
  the model writes the code, reads the printed product and answers ``\boxed{408}``; exact-match reward on the
  boxed answer). A tiny model cannot multiply; it can learn to copy the operands into code and the result
  into its answer. Its tokenizer has a character per printable ASCII character and the newline.

A task is the fixed list of all its prompts; :func:`toy_prompt_batches` streams it through
:class:`~alp_megatron.data.batches.PromptBatches`, so the stream is endless, fixed by the seed, and resumes from a
:class:`~alp_megatron.data.batches.DataPosition` like a file dataset. A prompt's ids are ``<bos>`` followed by one
token per character of its text; the model is expected to answer and then emit ``<eos>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from alp_megatron.data.batches import DataPosition, PromptBatches
from alp_megatron.data.prompts import Prompt
from alp_megatron.errors import ConfigError


def _add1() -> List[Tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]


def _sub1() -> List[Tuple[str, str]]:
    return [(f"{a}-{b}=", str(a - b)) for a in range(10) for b in range(a + 1)]


def _rev4() -> List[Tuple[str, str]]:
    return [(f"{n:04d}=", f"{n:04d}"[::-1]) for n in range(10_000)]


def _mul2() -> List[Tuple[str, str]]:
    return [(f"{a}*{b}=", str(a * b)) for a in range(10, 100) for b in range(10, 100)]


@dataclass(frozen=True)
class ToyTask:
    """A toy task: its examples, the longest response to sample, the name of its built-in reward, and for a
    multi-turn task the tool it is solved with (its tiny model's tokenizer then covers printable ASCII)."""

    name: str
    examples: Callable[[], List[Tuple[str, str]]]
    max_new_tokens: int
    reward: str
    tool: Optional[str] = None

    @property
    def characters(self) -> tuple:
        from alp_megatron.model.tiny import ASCII_CHARACTERS, CHARACTERS

        return ASCII_CHARACTERS if self.tool else CHARACTERS


TOY_TASKS: Dict[str, ToyTask] = {
    "add1": ToyTask("add1", _add1, max_new_tokens=4, reward="exact_match"),
    "sub1": ToyTask("sub1", _sub1, max_new_tokens=2, reward="exact_match"),
    "rev4": ToyTask("rev4", _rev4, max_new_tokens=5, reward="positional_match"),
    "mul2": ToyTask("mul2", _mul2, max_new_tokens=80, reward="boxed_match", tool="python"),
}


def tool_trace(prompt_text: str, answer: str, observe: Callable[[str], str]) -> List[Tuple[str, bool]]:
    """A correct multi-turn trajectory of a ``python``-tool toy task, as (text, written by the model) segments:
    the code that prints the result, the tool's observation (``observe(printed output)``, the turn format's
    rendering), and the boxed answer. The warm start learns the model's segments."""
    expression = prompt_text.rstrip("=")
    return [(f"```\nprint({expression})\n```", True), (observe(answer + "\n"), False),
            (f"\\boxed{{{answer}}}", True)]


def toy_task(name: str, field: str = "data.toy_task") -> ToyTask:
    """The task called ``name``; a ConfigError on ``field`` lists the choices otherwise."""
    if name not in TOY_TASKS:
        raise ConfigError(field, f"unknown toy task {name!r}", f"choose one of {', '.join(TOY_TASKS)}")
    return TOY_TASKS[name]


class ToyTaskPrompts:
    """All prompts of a toy task, tokenized with the char tokenizer (a :class:`PromptSource`).

    ``tokenizer`` defaults to :func:`alp_megatron.model.tiny.build_char_tokenizer`; any tokenizer with a
    ``bos_token_id`` and one token per character of the prompts works.
    """

    def __init__(self, task: str, tokenizer=None, field: str = "data.toy_task"):
        self.task = toy_task(task, field)
        if tokenizer is None:
            from alp_megatron.model.tiny import build_char_tokenizer

            tokenizer = build_char_tokenizer(self.task.characters)
        examples = self.task.examples()
        self._texts = [text for text, _ in examples]
        self._answers = [answer for _, answer in examples]
        encoded = tokenizer(self._texts, add_special_tokens=False)["input_ids"]
        unknown = getattr(tokenizer, "unk_token_id", None)
        for text, ids in zip(self._texts, encoded):
            if len(ids) != len(text) or (unknown is not None and unknown in ids):
                raise ConfigError(field, f"the tokenizer does not give one known token per character of {text!r}",
                                  "use the char tokenizer of alp_megatron.model.tiny")
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ConfigError(field, "the tokenizer has no <bos> token",
                              "use the char tokenizer of alp_megatron.model.tiny")
        self._ids = np.asarray([[bos] + ids for ids in encoded], dtype=np.int32)  # equal lengths within a task

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> Prompt:
        index = index if index >= 0 else len(self) + index
        return Prompt(prompt_ids=tuple(self._ids[index].tolist()), prompt_text=self._texts[index],
                      label=self._answers[index], metadata={"task": self.task.name}, index=index,
                      source=f"toy:{self.task.name}", row=index + 1)


def toy_prompt_batches(task: str, batch_size: int, seed: int = 0, tokenizer=None,
                       position: Optional[DataPosition] = None) -> PromptBatches:
    """An endless, seeded stream of ``batch_size`` prompts of ``task`` per batch, resumable from ``position``."""
    return PromptBatches(ToyTaskPrompts(task, tokenizer), batch_size, seed=seed, shuffle=True, position=position)
