"""Tests of alp_megatron/alp/advantages.py against hand-computed values."""

import math

import pytest
import torch

from alp_megatron.alp.advantages import broadcast_advantages, grpo_advantages


def test_grpo_contiguous_groups_hand_computed():
    # Group 0: [1, 0, 1, 1]: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5.
    # Group 1: [0, 0, 0, 2]: mean 0.5, unbiased std sqrt((3 * 0.5^2 + 1.5^2) / 3) = 1.0.
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0])
    adv = grpo_advantages(rewards, group_size=4)
    s0, s1 = 0.5 + 1e-6, 1.0 + 1e-6
    expected = [0.25 / s0, -0.75 / s0, 0.25 / s0, 0.25 / s0, -0.5 / s1, -0.5 / s1, -0.5 / s1, 1.5 / s1]
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_grpo_matches_torch_std_unbiased():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=gen, dtype=torch.float64)
    adv = grpo_advantages(rewards, group_size=3, eps=1e-6)
    groups = rewards.view(4, 3)
    expected = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(adv, expected.flatten(), rtol=1e-12, atol=1e-12)


def test_grpo_group_ids_interleaved_and_uneven():
    # ids: group 7 = rewards [3, 1] (mean 2, std sqrt(2)); group 2 = [5, 5, 8] (mean 6, std sqrt(3)).
    rewards = torch.tensor([3.0, 5.0, 1.0, 5.0, 8.0], dtype=torch.float64)
    ids = torch.tensor([7, 2, 7, 2, 2])
    adv = grpo_advantages(rewards, group_ids=ids, eps=0.0)
    r2, r3 = math.sqrt(2.0), math.sqrt(3.0)
    assert adv.tolist() == pytest.approx([1 / r2, -1 / r3, -1 / r2, -1 / r3, 2 / r3], rel=1e-12)
    assert grpo_advantages(rewards, group_ids=[7, 2, 7, 2, 2], eps=0.0).tolist() == adv.tolist()


def test_dr_grpo_no_std():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = grpo_advantages(rewards, group_size=3, std_normalize=False)
    assert adv.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3], rel=1e-6)


def test_single_sample_and_constant_groups_give_zero():
    rewards = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0, 2.0])
    ids = [0, 1, 1, 1, 2, 2]  # group 0 has one response, group 1 all equal
    for std_normalize in (True, False):
        adv = grpo_advantages(rewards, group_ids=ids, std_normalize=std_normalize)
        assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert adv[4].item() < 0 < adv[5].item()
    assert grpo_advantages(torch.tensor([3.0, -2.0]), group_size=1).tolist() == [0.0, 0.0]
    assert grpo_advantages(rewards, group_ids=ids, eps=0.0)[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # no 0 / 0


def test_integer_rewards_and_dtype():
    adv = grpo_advantages(torch.tensor([1, 0]), group_size=2)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)])
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), group_size=2).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rewards": torch.zeros(2, 2), "group_size": 2}, "1-D"),
        ({"rewards": torch.zeros(4), "group_ids": [0, 0, 1]}, "group_ids has shape"),
        ({"rewards": torch.zeros(4), "group_size": 3}, "group_size=3"),
        ({"rewards": torch.zeros(4), "group_size": 0}, "positive"),
        ({"rewards": torch.zeros(4)}, "exactly one"),
        ({"rewards": torch.zeros(4), "group_size": 2, "group_ids": [0, 0, 1, 1]}, "exactly one"),
        ({"rewards": torch.zeros(2), "group_ids": [0.0, 1.0]}, "integers"),
        ({"rewards": torch.zeros(2), "group_size": 2, "eps": -1.0}, "eps"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(**kwargs)


def test_broadcast_advantages():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert broadcast_advantages(adv, mask).tolist() == [[0.5, 0.5, 0.0], [0.0, -2.0, -2.0]]
    with pytest.raises(ValueError, match="broadcast_advantages"):
        broadcast_advantages(adv, mask[:1])
