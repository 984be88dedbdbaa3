"""Rewards of the toy tasks the embedded CPU demo trains on (``alp_megatron.data.toy``).

What the functions expect as ``response_text``: the response decoded character by character, either

- decoded with special tokens kept (``skip_special_tokens=False``): the prediction is the text before the first
  ``"<eos>"``, and anything after it is ignored; or
- decoded from the tokens *before* the first end-of-sequence token only (what an engine that stops at
  ``<eos>`` returns, decoded with ``skip_special_tokens=True``).

Do not decode a response that runs past its ``<eos>`` with ``skip_special_tokens=True``: the text after the
``<eos>`` would join the prediction. A response with no ``<eos>`` (it hit the token limit) is scored on all of its
text, so extra characters cost a positional reward its share. Nothing is stripped: a space is a character.

The label is the expected answer text ("4321"); an int label (15) is compared as its decimal text.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from alp_megatron.rewards.base import RewardError

EOS_TEXT = "<eos>"


def prediction_text(response_text: str) -> str:
    """The prediction of a decoded response: its text before the first ``"<eos>"``."""
    if not isinstance(response_text, str):
        raise RewardError(
            f"toy-task rewards take the decoded response text, got {type(response_text).__name__}. "
            "Fix: decode the response ids with the tokenizer before scoring"
        )
    return response_text.split(EOS_TEXT, 1)[0]


def answer_text(label: Any) -> str:
    """The expected answer from a toy-task label: a non-empty string, or an int as decimal text."""
    if isinstance(label, str) and label:
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    raise RewardError(
        f"a toy-task label must be the answer text (a non-empty string such as '4321') or an int, got {label!r}. "
        "Fix: set data.label_field to the field holding the answer"
    )


def positional_match(prediction: str, answer: str) -> float:
    """Characters equal at the same position, divided by ``max(len(prediction), len(answer))``.

    "4321" vs "4321" -> 1.0; "4311" -> 0.75; "432" -> 0.75; "43210" -> 0.8; "" -> 0.0.
    """
    longest = max(len(prediction), len(answer))
    if longest == 0:
        return 1.0
    return sum(p == a for p, a in zip(prediction, answer)) / longest


def positional_match_reward(prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """The partial reward of ``rev4``: :func:`positional_match` of the prediction against the label."""
    return positional_match(prediction_text(response_text), answer_text(label))


def exact_match_reward(prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the prediction equals the label exactly, else 0.0 (``add1``, ``sub1``, exact ``rev4``)."""
    return 1.0 if prediction_text(response_text) == answer_text(label) else 0.0


def boxed_answer(response_text: str) -> Optional[str]:
    """The text inside the last ``\\boxed{...}`` of a prediction (nested braces kept), or None."""
    text = prediction_text(response_text)
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def boxed_match_reward(prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the last ``\\boxed{...}`` of the prediction holds exactly the label, else 0.0 (``mul2``)."""
    return 1.0 if boxed_answer(response_text) == answer_text(label) else 0.0
