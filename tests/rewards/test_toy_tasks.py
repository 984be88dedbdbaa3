"""Tests of alp_megatron/rewards/toy_tasks.py against hand-computed rewards."""

import pytest

from alp_megatron.rewards.base import RewardError
from alp_megatron.rewards.toy_tasks import (
    exact_match_reward,
    positional_match,
    positional_match_reward,
    prediction_text,
)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("4321", 1.0),  # decoded from the tokens before <eos>
        ("4321<eos>", 1.0),  # decoded with special tokens kept
        ("4321<eos>99<pad><pad>", 1.0),  # what follows the first <eos> is ignored
        ("4311<eos>", 0.75),  # 3 of 4 positions
        ("432<eos>", 0.75),  # 3 equal / max(3, 4)
        ("43210", 0.8),  # no <eos>: all 5 characters count, 4 equal / 5
        ("1234<eos>", 0.0),  # no position equal
        ("1321<eos>", 0.75),
        ("<eos>", 0.0),  # empty prediction
        (" 4321<eos>", 0.0),  # a leading space shifts every position: nothing is stripped
        ("43<eos>21", 0.5),  # 2 equal / max(2, 4)
    ],
)
def test_positional_match_reward_rev4_hand_computed(response, expected):
    assert positional_match_reward("1234=", response, "4321", {}) == pytest.approx(expected)


def test_positional_match_edge_cases():
    assert positional_match("", "") == 1.0
    assert positional_match("abc", "") == 0.0
    assert positional_match("12345678", "1234") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "response, label, expected",
    [
        ("8<eos>", "8", 1.0),
        ("8", "8", 1.0),
        ("15<eos>", "15", 1.0),
        ("15<eos>", 15, 1.0),  # an int label compares as its decimal text
        ("1<eos>", "15", 0.0),  # a prefix is not a match
        ("150", "15", 0.0),  # no <eos>: the extra digit counts
        ("02<eos>", "2", 0.0),
        ("4321<eos>", "4321", 1.0),  # rev4 exact
        ("4311<eos>", "4321", 0.0),
    ],
)
def test_exact_match_reward_hand_computed(response, label, expected):
    assert exact_match_reward("3+5=", response, label, {}) == expected


def test_prediction_text_cuts_at_the_first_eos():
    assert prediction_text("12<eos>34<eos>") == "12"
    assert prediction_text("12") == "12"


@pytest.mark.parametrize("label", [None, "", True, 1.5, ["4321"]])
def test_bad_labels_are_errors_naming_the_value(label):
    with pytest.raises(RewardError, match="toy-task label") as info:
        exact_match_reward("1234=", "4321", label, {})
    assert repr(label) in str(info.value)


def test_a_response_that_is_not_text_is_an_error():
    with pytest.raises(RewardError, match="decode the response ids"):
        positional_match_reward("1234=", [7, 6, 5, 4], "4321", {})


@pytest.mark.parametrize("response, expected", [
    ("```\nprint(12*34)\n```\nCode execution result: 408\n\n\\boxed{408}<eos>", 1.0),
    ("\\boxed{407}", 0.0), ("408", 0.0), ("\\boxed{408", 0.0),
    ("\\boxed{1} then \\boxed{408}", 1.0),  # the last one counts
    ("\\boxed{408}<eos>\\boxed{1}", 1.0),  # nothing after <eos>
])
def test_boxed_match_reward_hand_computed(response, expected):
    from alp_megatron.rewards.toy_tasks import boxed_match_reward

    assert boxed_match_reward("12*34=", response, "408", {}) == expected
