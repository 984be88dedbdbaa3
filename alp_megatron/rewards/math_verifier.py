"""A math answer verifier: extract the final answer of a response and compare it with the label, symbolically.

Extraction and comparison are HuggingFace's ``math-verify`` library (parses LaTeX and plain expressions into
sympy). Its extraction takes an anchored answer, a ``\\boxed{...}`` or one after "the answer is" / "final answer
is" (math-verify ranks these among themselves), and otherwise the last number or expression of the response;
equivalence is numeric or symbolic, so ``0.5``, ``1/2``, ``\\frac{2}{4}`` and ``50\\%`` all match a label of ``1/2``.

Time limits: math-verify bounds each parse and comparison with ``signal.alarm``, which works only in the main
thread (elsewhere it raises ``ValueError: signal only works in main thread``). :class:`MathVerifier` therefore
passes ``timeout_seconds`` when it runs in the main thread and no limit in any other thread; it never fails for
being in a thread, but a pathological answer could then take long (math-verify logs once that its timeout is
off). Score in the main thread (an asyncio loop there is fine) or in worker processes, whose main threads get the
limit again. A parse that times out counts as no answer, a comparison that times out as incorrect.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Mapping, Optional

from alp_megatron.errors import ConfigError
from alp_megatron.rewards.base import RewardError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'math-verify>=0.9,<0.10'"


@dataclass(frozen=True)
class MathVerifierConfig:
    """Rewards of the three outcomes, and the per-operation time limit.

    ``no_answer_reward`` is the format penalty: the reward of a response from which no answer can be extracted
    (e.g. -0.5 to push the model to always commit to an answer); by default it equals ``incorrect_reward``.
    """

    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    no_answer_reward: Optional[float] = None
    timeout_seconds: int = 5

    def __post_init__(self):
        for name in ("correct_reward", "incorrect_reward", "no_answer_reward"):
            value = getattr(self, name)
            if value is None and name == "no_answer_reward":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"reward.math.{name}", f"must be a finite number, got {value!r}", "use e.g. 0.0")
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise ConfigError(
                "reward.math.timeout_seconds",
                f"must be a whole number of seconds >= 0, got {self.timeout_seconds!r}",
                "use e.g. 5 (signal.alarm counts whole seconds), or 0 for no limit",
            )

    @property
    def reward_without_answer(self) -> float:
        return self.incorrect_reward if self.no_answer_reward is None else self.no_answer_reward


def label_text(label: Any) -> str:
    """A scalar label as text math-verify can parse: strings as given, numbers in plain decimal notation."""
    if isinstance(label, str) and label.strip():
        return label.strip()
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if isinstance(label, float) and math.isfinite(label):
        return format(Decimal(repr(label)), "f")  # 1e-05 -> 0.00001: the exponent form does not parse
    raise RewardError(
        f"a math label must be a non-empty string or a finite number (or a list of them), got {label!r}. "
        "Fix: store the final answer (e.g. '\\frac{1}{2}' or 0.5) in the dataset's label field"
    )


def _as_latex_answer(text: str) -> str:
    # A bare label such as "x+1" or "(1,2)" parses only inside a math environment; text that already has
    # one ($...$ or \boxed) is parsed as written.
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return "\\boxed{" + text + "}"


class MathVerifier:
    """A :class:`~alp_megatron.rewards.base.RewardFunction` for math answers.

    ``label`` is the reference answer: a string (LaTeX or plain, e.g. ``"\\frac{1}{2}"``, ``"0.5"``, ``"x+1"``),
    a number, or a list of acceptable answers. Raises :class:`RewardError` at construction when math-verify is
    not installed, and when a label holds no parsable answer.
    """

    def __init__(self, config: MathVerifierConfig = MathVerifierConfig()):
        try:
            math_verify = importlib.import_module("math_verify")
        except ImportError as error:
            raise RewardError(
                f"the math reward needs the math-verify package, which cannot be imported ({error}). "
                f"Fix: {INSTALL_HINT}"
            ) from error
        self.config = config
        self._parse = math_verify.parse
        self._verify = math_verify.verify
        self._warned_about_thread = False
        self._parse_label = functools.lru_cache(maxsize=4096)(self._parse_label_uncached)

    def _timeout(self) -> Optional[int]:
        if threading.current_thread() is threading.main_thread():
            return self.config.timeout_seconds or None
        if self.config.timeout_seconds and not self._warned_about_thread:
            self._warned_about_thread = True
            logger.warning(
                "math verifier called outside the main thread: parses and comparisons run without the %d s limit "
                "(signal.alarm works only in the main thread)",
                self.config.timeout_seconds,
            )
        return None

    def _parse_label_uncached(self, text: str, timeout: Optional[int]) -> tuple:
        parsed = self._parse(_as_latex_answer(text), parsing_timeout=timeout)
        if not parsed:
            raise RewardError(
                f"the math label {text!r} holds no answer math-verify can parse. "
                "Fix: store only the final answer, in LaTeX or as a number"
            )
        return tuple(parsed)

    def gold_answers(self, label: Any) -> list:
        """The parsed reference answers of ``label`` (each a sympy object or its string form)."""
        labels = label if isinstance(label, (list, tuple)) and label else [label]
        timeout = self._timeout()
        answers: list = []
        for item in labels:
            answers.extend(self._parse_label(label_text(item), timeout))
        return answers

    def extract_answer(self, response_text: str) -> list:
        """The final answer math-verify extracts from ``response_text``: ``[]`` when there is none."""
        if not isinstance(response_text, str):
            raise RewardError(
                f"the math reward takes the decoded response text, got {type(response_text).__name__}. "
                "Fix: decode the response ids before scoring"
            )
        return self._parse(response_text, parsing_timeout=self._timeout())

    def is_correct(self, response_text: str, label: Any) -> Optional[bool]:
        """True / False, or None when the response holds no answer."""
        gold = self.gold_answers(label)
        predicted = self.extract_answer(response_text)
        if not predicted:
            return None
        return bool(self._verify(gold, predicted, timeout_seconds=self._timeout()))

    def __call__(self, prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]) -> float:
        outcome = self.is_correct(response_text, label)
        if outcome is None:
            return float(self.config.reward_without_answer)
        return float(self.config.correct_reward if outcome else self.config.incorrect_reward)
