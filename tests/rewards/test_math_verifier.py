"""Tests of alp_megatron/rewards/math_verifier.py on a table of correct and incorrect answers."""

import sys
import threading

import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.rewards.base import RewardError
from alp_megatron.rewards.math_verifier import MathVerifier, MathVerifierConfig, label_text


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier()


CORRECT = [
    ("The answer is \\boxed{\\frac{1}{2}}", "1/2"),
    ("So we get 0.5", "\\frac{1}{2}"),  # decimal vs fraction
    ("The answer is 0.5.", 0.5),  # numeric label
    ("\\boxed{\\frac{2}{4}}", "0.5"),  # unreduced fraction
    ("\\boxed{50\\%}", "1/2"),  # percent
    ("The answer is 7", "7.0"),
    ("The answer is 1,000", "1000"),  # thousands separator
    ("The answer is -3", -3),
    ("First 12 apples, then finally 7", "7"),  # no anchor: the last number
    ("\\boxed{5}, though one might guess 6", "5"),  # \boxed wins over a later number
    ("The final answer is $2x+2$", "2(x+1)"),  # symbolic equivalence
    ("The answer is $\\sqrt{2}/2$", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(1,2)}", "(1,2)"),  # an interval label parses inside \boxed
    ("The answer is 0.00001", 1e-05),  # a float label in exponent form
    ("The answer is 3", ["4", "3"]),  # any of several acceptable answers
    ("The answer is $\\frac{3}{4}$", "$\\frac{3}{4}$"),  # a label already in a math environment
]

INCORRECT = [
    ("\\boxed{3}", "4"),
    ("The answer is 6", "5"),
    ("The answer is 3", "-3"),  # sign
    ("The answer is 1/3", "0.3"),
    ("The final answer is $2x+1$", "2(x+1)"),
    ("\\boxed{\\frac{1}{2}}", "2"),
    ("The answer is 3", ["4", "5"]),
]


@pytest.mark.parametrize("response, label", CORRECT)
def test_correct_answers_score_one(verifier, response, label):
    assert verifier("question", response, label, {}) == 1.0


@pytest.mark.parametrize("response, label", INCORRECT)
def test_incorrect_answers_score_zero(verifier, response, label):
    assert verifier("question", response, label, {}) == 0.0


def test_rewards_and_format_penalty_are_configurable():
    verifier = MathVerifier(MathVerifierConfig(correct_reward=2.0, incorrect_reward=-1.0, no_answer_reward=-0.5))
    assert verifier("q", "The answer is 4", "4", {}) == 2.0
    assert verifier("q", "The answer is 5", "4", {}) == -1.0
    assert verifier("q", "I cannot tell.", "4", {}) == -0.5
    assert verifier("q", "", "4", {}) == -0.5
    # By default a response without an answer earns the incorrect reward.
    assert MathVerifier(MathVerifierConfig(incorrect_reward=-1.0))("q", "no idea", "4", {}) == -1.0


def test_extract_answer_finds_nothing_in_plain_words(verifier):
    assert verifier.extract_answer("no numbers here") == []
    assert verifier.is_correct("no numbers here", "3") is None


def test_verifier_works_off_the_main_thread(verifier):
    # math-verify's signal.alarm timeout raises in a worker thread; the verifier runs there without the limit.
    results, errors = [], []

    def score():
        try:
            results.append(verifier("q", "The answer is \\frac{1}{2}", "0.5", {}))
            results.append(verifier("q", "The answer is 2", "0.5", {}))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert errors == []
    assert results == [1.0, 0.0]


@pytest.mark.parametrize("label", [None, "", "   ", True, float("nan"), {"answer": 1}, []])
def test_bad_labels_are_errors_naming_the_label(verifier, label):
    with pytest.raises(RewardError, match="math label must be") as info:
        verifier("q", "The answer is 1", label, {})
    assert repr(label) in str(info.value)


def test_unparsable_label_is_an_error(verifier):
    with pytest.raises(RewardError, match="holds no answer"):
        verifier("q", "The answer is 1", "\\boxed{}", {})


def test_label_text_writes_floats_without_exponent():
    assert label_text(1e-05) == "0.00001"
    assert label_text(2.5) == "2.5"
    assert label_text(12) == "12"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"correct_reward": "1"}, "reward.math.correct_reward"),
        ({"incorrect_reward": float("inf")}, "reward.math.incorrect_reward"),
        ({"no_answer_reward": True}, "reward.math.no_answer_reward"),
        ({"timeout_seconds": 1.5}, "reward.math.timeout_seconds"),
        ({"timeout_seconds": -1}, "reward.math.timeout_seconds"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        MathVerifierConfig(**kwargs)
    assert info.value.field == field


def test_missing_library_is_a_clear_error_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(RewardError, match=r"math-verify.*pip install 'math-verify"):
        MathVerifier()
