"""Tests of alp_megatron/alp/stats.py against hand-computed values."""

import math

import pytest
import torch

from alp_megatron.alp.stats import (
    QUANTILE_KEYS,
    masked_fraction,
    masked_mean,
    masked_quantiles,
    mismatch_kl,
    ratio_quantiles,
)


def test_masked_quantiles_hand_computed():
    # 1..101 masked in, junk masked out. Linear interpolation at position q * (n - 1) = q * 100:
    # p0.1 -> 1.1, p1 -> 2, p2 -> 3, p50 -> 51, p98 -> 99, p99 -> 100, p99.9 -> 100.9.
    values = torch.cat([torch.arange(1.0, 102.0), torch.tensor([1e9, -1e9, float("nan")])])
    mask = torch.cat([torch.ones(101, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)])
    q = masked_quantiles(values.view(2, 52), mask.view(2, 52), prefix="x_")
    expected = {"x_p0.1": 1.1, "x_p1": 2.0, "x_p2": 3.0, "x_p50": 51.0, "x_p98": 99.0, "x_p99": 100.0,
                "x_p999": 100.9, "x_max": 101.0, "x_min": 1.0}
    assert q.keys() == expected.keys()
    for key, value in expected.items():
        assert q[key] == pytest.approx(value, rel=1e-12), key


def test_masked_quantiles_matches_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(37, generator=gen, dtype=torch.float64).exp()
    q = masked_quantiles(values, torch.ones(37, dtype=torch.bool))
    levels = torch.tensor([0.001, 0.01, 0.02, 0.5, 0.98, 0.99, 0.999], dtype=torch.float64)
    expected = torch.quantile(values, levels).tolist()
    assert [q[k] for k in ("p0.1", "p1", "p2", "p50", "p98", "p99", "p999")] == pytest.approx(expected, rel=1e-12)


def test_masked_quantiles_single_and_empty():
    one = masked_quantiles(torch.tensor([3.0, 7.0]), torch.tensor([False, True]))
    assert set(one.values()) == {7.0}
    empty = masked_quantiles(torch.tensor([3.0]), torch.tensor([False]))
    assert set(empty) == set(QUANTILE_KEYS) and all(math.isnan(v) for v in empty.values())


def test_ratio_quantiles_sequence_mask():
    token_ratio = torch.tensor([[1.0, 2.0], [4.0, 8.0], [100.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    seq_ratio = torch.tensor([2.0, 4.0, 1000.0])  # row 2 has no tokens: not counted
    out = ratio_quantiles(token_ratio, seq_ratio, mask)
    assert out["ratio_token_max"] == 4.0 and out["ratio_token_min"] == 1.0 and out["ratio_token_p50"] == 2.0
    assert out["ratio_seq_max"] == 4.0 and out["ratio_seq_min"] == 2.0
    assert out["ratio_seq_p50"] == pytest.approx(3.0)
    assert out["ratio_seq_p999"] == pytest.approx(2.0 + 2.0 * 0.999)
    with pytest.raises(ValueError, match="seq_ratio"):
        ratio_quantiles(token_ratio, seq_ratio[:2], mask)


def test_mismatch_kl_hand_computed():
    # log_ratio = trainer - rollout on the masked tokens: 0.1, -0.2, 0.3 (the fourth is masked out).
    rollout = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    trainer = torch.tensor([[-0.9, -2.2], [-0.2, 50.0]])
    mask = torch.tensor([[True, True], [True, False]])
    lr = [0.1, -0.2, 0.3]
    out = mismatch_kl(trainer, rollout, mask)
    assert out["mismatch_k1"] == pytest.approx(-sum(lr) / 3, rel=1e-6)
    assert out["mismatch_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in lr) / 3, rel=1e-6)
    assert out["train_rollout_logprob_abs_diff"] == pytest.approx(sum(abs(x) for x in lr) / 3, rel=1e-6)
    assert out["mismatch_k3"] > 0
    same = mismatch_kl(rollout, rollout, mask)
    assert same == {"mismatch_k1": 0.0, "mismatch_k3": 0.0, "train_rollout_logprob_abs_diff": 0.0}
    assert mismatch_kl(trainer, rollout, torch.zeros(2, 2, dtype=torch.bool))["mismatch_k3"] == 0.0


def test_masked_mean_and_fraction():
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0
    assert masked_fraction(values > 2, mask) == pytest.approx(2 / 3)
    assert masked_fraction(values > 2, torch.zeros(2, 2)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        masked_mean(values, mask[:1])


def test_train_inference_ratio_is_the_sequence_ratio_against_the_engine():
    from alp_megatron.alp.stats import train_inference_ratio

    trained = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5]])
    rollout = torch.tensor([[0.0, -1.5, -2.0], [0.0, -0.5, -1.5]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])  # the second sample's last token is padding
    metrics = train_inference_ratio(trained, rollout, mask)
    assert metrics["train_infer_ratio_seq_max"] == pytest.approx(math.exp(0.5))
    assert metrics["train_infer_ratio_seq_min"] == pytest.approx(1.0)
    clamped = train_inference_ratio(trained + 100 * mask, rollout, mask, log_clamp=20.0)
    assert clamped["train_infer_ratio_seq_max"] == pytest.approx(math.exp(20.0))
    mismatch = train_inference_ratio(trained, rollout, mask, prefix="mismatch_ratio_seq_")
    assert mismatch["mismatch_ratio_seq_max"] == metrics["train_infer_ratio_seq_max"]
    assert not [key for key in mismatch if not key.startswith("mismatch_ratio_seq_")]
