"""Tests of alp_megatron/alp/loss.py against numbers computed by hand (plain Python math, no torch)."""

import math

import pytest
import torch

from alp_megatron.alp.loss import (
    LossConfig,
    aggregate,
    get_loss_method,
    loss_methods,
    policy_loss,
    register_loss,
)
from alp_megatron.errors import ConfigError

ALL_METHODS = ("alp_seq", "alp_token", "bypass", "grpo", "tis", "seq_tis", "mis", "token_mis", "icepop", "gspo")


def ref_token_loss(adv, ratio, eps_low, eps_high, c=10.0):
    """Clipped + dual-clipped surrogate of one token, written out in plain Python."""
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = max(unclipped, clipped)
    if adv < 0:
        loss = min(loss, -adv * c)
    return loss


def t(rows, requires_grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def token_mean(losses, mask):
    num = sum(v for row, mrow in zip(losses, mask) for v, m in zip(row, mrow) if m)
    den = sum(m for mrow in mask for m in mrow)
    return num / den


def seq_mean_token_mean(losses, mask):
    means = [sum(v for v, m in zip(row, mrow) if m) / sum(mrow) for row, mrow in zip(losses, mask) if sum(mrow)]
    return sum(means) / len(means)


# A small batch used by several tests: two sequences, the second padded by one token.
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]]
MU = [[-1.1, -1.9, -0.6], [-0.2, -0.9, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -0.5]


# ------------------------------------------------------------------------------------------- ALP / bypass


@pytest.mark.parametrize("method", ["alp_seq", "bypass"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_alp_seq_hand_computed(agg, method):
    """bypass is alp_seq's loss (the perturbation off is the model's business): the ratio's denominator is the
    engine's logprobs, never pi_old (given here equal to logp: a ratio against it would be 1)."""
    # S_0 = 0.1 - 0.1 + 0.1 = 0.1, S_1 = -0.1 + 0.2 = 0.1: both sequence ratios e^0.1, inside [0.5, 4].
    r = math.exp(0.1)
    losses = [[ref_token_loss(a, r, 0.5, 3.0) for _ in range(3)] for a in ADV]
    expected = token_mean(losses, MASK) if agg == "token_mean" else seq_mean_token_mean(losses, MASK)
    assert losses[0][0] == pytest.approx(-r) and losses[1][0] == pytest.approx(0.5 * r)
    loss, metrics = policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig(method=method, agg=agg),
                                old_logprobs=t(LOGP))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-12)
    assert metrics["ratio_seq_max"] == pytest.approx(r, rel=1e-12)
    assert metrics["ratio_token_mean"] == pytest.approx(r, rel=1e-12)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == metrics["dual_clip_frac"] == 0.0


@pytest.mark.parametrize("method", ["alp_seq", "bypass"])
def test_alp_seq_clips_on_the_sequence_ratio(method):
    # Per-token diffs are small but add up: S = 3 * 0.5 = 1.5, e^1.5 = 4.48 > 4 -> clipped for A > 0.
    logp, mu = [[-1.0, -1.0, -1.0]], [[-1.5, -1.5, -1.5]]
    lp = t(logp, requires_grad=True)
    loss, metrics = policy_loss(lp, t(mu), t([2.0]), t([[1, 1, 1]]), LossConfig(method=method))
    assert loss.item() == pytest.approx(-2.0 * 4.0)
    assert metrics["clip_frac_high"] == 1.0
    loss.backward()
    assert torch.all(lp.grad == 0)


def test_alp_seq_geometric_mean_option():
    # Geometric: S / n. Row 0: 0.1 / 3, row 1: 0.1 / 2.
    cfg = LossConfig(method="alp_seq", seq_ratio_geometric_mean=True)
    r0, r1 = math.exp(0.1 / 3), math.exp(0.1 / 2)
    losses = [[ref_token_loss(ADV[0], r0, 0.5, 3.0)] * 3, [ref_token_loss(ADV[1], r1, 0.5, 3.0)] * 3]
    loss, metrics = policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), cfg)
    assert loss.item() == pytest.approx(token_mean(losses, MASK), rel=1e-12)
    assert metrics["ratio_seq_max"] == pytest.approx(r1, rel=1e-12)
    assert metrics["ratio_seq_min"] == pytest.approx(r0, rel=1e-12)


def test_alp_token_hand_computed_with_every_clip():
    # log ratios: row 0 (A = 1): r = e^1 (inside), e^2 = 7.39 (> 4: high clip), e^-1 = 0.37 (< 0.5, but A > 0:
    # no clip). Row 1 (A = -0.5): e^3 = 20.1 (> c = 10: dual clip), e^-1 (< 0.5: low clip), e^0.5 (inside).
    log_ratio = [[1.0, 2.0, -1.0], [3.0, -1.0, 0.5]]
    mu = [[-2.0, -3.0, -0.5], [-4.0, -0.2, -1.0]]
    logp = [[m + d for m, d in zip(mr, dr)] for mr, dr in zip(mu, log_ratio)]
    mask = [[1, 1, 1], [1, 1, 1]]
    losses = [[ref_token_loss(a, math.exp(d), 0.5, 3.0) for d in row] for a, row in zip(ADV, log_ratio)]
    assert losses[0][1] == pytest.approx(-4.0)
    assert losses[1] == pytest.approx([5.0, 0.25, 0.5 * math.exp(0.5)])
    lp = t(logp, requires_grad=True)
    loss, metrics = policy_loss(lp, t(mu), t(ADV), t(mask), LossConfig(method="alp_token"))
    assert loss.item() == pytest.approx(token_mean(losses, mask), rel=1e-12)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 6)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 6)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 6)
    assert metrics["ratio_token_max"] == pytest.approx(math.exp(3.0))
    # Sequence ratio of a token method: the product of its token ratios.
    assert metrics["ratio_seq_max"] == pytest.approx(math.exp(2.5))
    assert metrics["ratio_seq_min"] == pytest.approx(math.exp(2.0))
    loss.backward()
    # d/dl of -A e^(l - mu) is -A r; clipped tokens get nothing.
    expected_grad = [
        [-1.0 * math.exp(1.0) / 6, 0.0, -1.0 * math.exp(-1.0) / 6],
        [0.0, 0.0, 0.5 * math.exp(0.5) / 6],
    ]
    assert lp.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected_grad]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("geometric", [False, True])
def test_alp_seq_gradient_per_token(agg, geometric):
    # Unclipped: L_t = -A r_seq with r_t = exp(sg(S) + l_t - sg(l_t)), so dL_t/dl_t = -A r_seq and nothing
    # leaks to other tokens. token_mean divides by N tokens, seq_mean_token_mean by n_b * (#sequences).
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    mu = logp + 0.02 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    lp = logp.clone().requires_grad_(True)
    cfg = LossConfig(agg=agg, seq_ratio_geometric_mean=geometric)
    loss, metrics = policy_loss(lp, mu, adv, mask, cfg)
    loss.backward()
    n_b = mask.sum(-1).double()
    seq_log = ((logp - mu) * mask).sum(-1)
    r_seq = torch.exp(seq_log / n_b if geometric else seq_log)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
    denom = mask.sum().double() if agg == "token_mean" else n_b[:, None] * 3
    expected = -adv[:, None] * r_seq[:, None] * mask / denom
    torch.testing.assert_close(lp.grad, expected, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------- baselines


def test_grpo_hand_computed_and_ignores_rollout_logprobs():
    # log(pi/pi_old): row 0 (A = 1): 0.1 (inside [0.8, 1.28]), 0.5 (1.65: high clip), -0.3 (0.74, A > 0: no
    # clip). Row 1 (A = -0.5): -0.5 (0.61 < 0.8: low clip), 0.2 (1.22: inside), padding.
    old = [[-1.0, -1.5, -0.2], [-0.6, -2.0, 0.0]]
    diff = [[0.1, 0.5, -0.3], [-0.5, 0.2, 0.0]]
    logp = [[o + d for o, d in zip(orow, drow)] for orow, drow in zip(old, diff)]
    losses = [[ref_token_loss(a, math.exp(d), 0.2, 0.28) for d in row] for a, row in zip(ADV, diff)]
    assert losses[0][1] == pytest.approx(-1.28) and losses[1][0] == pytest.approx(0.5 * 0.8)
    expected = token_mean(losses, MASK)
    cfg = LossConfig(method="grpo")
    loss, metrics = policy_loss(t(logp), t(MU), t(ADV), t(MASK), cfg, old_logprobs=t(old))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 5)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 5)
    other_mu = [[v - 3.0 for v in row] for row in MU]
    loss2, _ = policy_loss(t(logp), t(other_mu), t(ADV), t(MASK), cfg, old_logprobs=t(old))
    assert loss2.item() == loss.item()


def test_tis_hand_computed_weight_is_detached():
    # old - mu = 0.1 (w = 1.105), 1.0 (e = 2.72 -> capped at 2), -0.5 (w = 0.61); the ratio to old is 1.
    mu = [[-1.0, -2.0, -0.5]]
    old = [[-0.9, -1.0, -1.0]]
    weights = [math.exp(0.1), 2.0, math.exp(-0.5)]
    adv = 1.5
    expected = sum(-adv * 1.0 * w for w in weights) / 3
    lp = t(old, requires_grad=True)
    old_t = t(old, requires_grad=True)
    loss, metrics = policy_loss(lp, t(mu), t([adv]), t([[1, 1, 1]]), LossConfig(method="tis"), old_logprobs=old_t)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["tis_weight_mean"] == pytest.approx(sum(weights) / 3, rel=1e-12)
    assert metrics["tis_clip_frac"] == pytest.approx(1 / 3)
    grad_lp, grad_old = torch.autograd.grad(loss, [lp, old_t], allow_unused=True)
    assert grad_old is None  # the weight and pi_old are constants of the loss
    assert grad_lp.tolist() == [pytest.approx([-adv * w / 3 for w in weights], rel=1e-12)]


# The rollout corrections below all keep the grpo ratio at 1 (logprobs = old) with A = -1, so every token's
# surrogate is exactly 1 and the loss is the token mean of the correction's weight. Sequences of 2 tokens.
A_NEG = [-1.0, -1.0, -1.0]
MU3 = [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]
MASK3 = [[1, 1], [1, 1], [1, 1]]


def _correction(method, old, **options):
    """(loss, metrics, d loss / d logprobs) of ``method`` with logprobs = old (ratio 1) and A = -1."""
    lp = t(old, requires_grad=True)
    old_t = t(old, requires_grad=True)
    loss, metrics = policy_loss(lp, t(MU3[: len(old)]), t(A_NEG[: len(old)]), t(MASK3[: len(old)]),
                                LossConfig(method=method, **options), old_logprobs=old_t)
    grad_lp, grad_old = torch.autograd.grad(loss, [lp, old_t], allow_unused=True)
    assert grad_old is None  # the weights and pi_old are constants of the loss
    return loss.item(), metrics, grad_lp


@pytest.mark.parametrize("mis_low,kept", [(0.0, [True, False, True]), (0.1, [True, False, False])])
def test_mis_weights_kept_sequences_by_their_importance_weight(mis_low, kept):
    # sum_t (old - mu) per sequence: 0.5 (w = e^0.5: kept), 2.0 (e^2 = 7.39 > 5: dropped), -30 (clamped to -20:
    # w = e^-20, kept only while mis_low = 0). Dropped sequences stay in the denominator (6 tokens).
    old = [[-0.75, -0.75], [0.0, 0.0], [-16.0, -16.0]]
    weights = [math.exp(0.5), 0.0, math.exp(-20.0)]
    weights = [w if keep else 0.0 for w, keep in zip(weights, kept)]
    loss, metrics, grad = _correction("mis", old, mis_low=mis_low)
    assert loss == pytest.approx(2 * sum(weights) / 6, rel=1e-12)
    assert grad.tolist() == [pytest.approx([w / 6] * 2, rel=1e-12, abs=1e-300) for w in weights]
    assert metrics["mis_masked_frac"] == pytest.approx(kept.count(False) / 3)
    assert metrics["mis_weight_mean"] == pytest.approx(sum(weights) / 3, rel=1e-12)
    indicator, _, _ = _correction("mis", old, mis_low=mis_low, mis_weight="indicator")
    assert indicator == pytest.approx(2 * kept.count(True) / 6, rel=1e-12)


def test_mis_bounds_and_clamp_edges():
    # A weight exactly at a bound is kept: sum(old - mu) = 0 gives w = 1 exactly.
    assert _correction("mis", [[-1.0, -1.0]], mis_high=1.0)[0] == 1.0
    assert _correction("mis", [[-1.0, -1.0]], mis_low=1.0, mis_high=2.0)[0] == 1.0
    assert _correction("mis", [[-1.0, -1.0]], mis_high=0.999)[0] == 0.0
    # The log weight is clamped to [-20, 20] before exponentiating: -25 weighs e^-20, not e^-25.
    assert _correction("mis", [[-13.5, -13.5]])[0] == pytest.approx(math.exp(-20.0), rel=1e-12)
    assert _correction("mis", [[-13.5, -13.5]], log_ratio_clamp=30.0)[0] == pytest.approx(math.exp(-25.0),
                                                                                        rel=1e-12)


def test_token_mis_masks_tokens_outside_the_bounds():
    # old - mu per token: 0.5 (kept, e^0.5), 2.0 (7.39 > 5: masked), -25 (clamped: e^-20), 0 (w = 1).
    old = [[-0.5, 1.0], [-26.0, -1.0]]
    weights = [[math.exp(0.5), 0.0], [math.exp(-20.0), 1.0]]
    loss, metrics, grad = _correction("token_mis", old)
    assert loss == pytest.approx(sum(map(sum, weights)) / 4, rel=1e-12)
    assert grad.tolist() == [pytest.approx([w / 4 for w in row], rel=1e-12, abs=1e-300) for row in weights]
    assert metrics["mis_masked_frac"] == pytest.approx(1 / 4)
    indicator, _, _ = _correction("token_mis", old, mis_weight="indicator")
    assert indicator == pytest.approx(3 / 4, rel=1e-12)
    assert _correction("token_mis", [[-1.0, -1.0]], mis_high=1.0)[0] == 1.0  # w = 1 at the bound: kept


def test_seq_tis_truncates_the_sequence_weight():
    # sum(old - mu): 0.5 (e^0.5), 2.0 (e^2 = 7.39: truncated at the default cap 5), -30 (clamped: e^-20).
    old = [[-0.75, -0.75], [0.0, 0.0], [-16.0, -16.0]]
    weights = [math.exp(0.5), 5.0, math.exp(-20.0)]
    loss, metrics, grad = _correction("seq_tis", old)
    assert loss == pytest.approx(2 * sum(weights) / 6, rel=1e-12)
    assert grad.tolist() == [pytest.approx([w / 6] * 2, rel=1e-12) for w in weights]
    assert metrics["tis_clip_frac"] == pytest.approx(1 / 3)
    assert metrics["tis_weight_mean"] == pytest.approx(sum(weights) / 3, rel=1e-12)
    capped, _, _ = _correction("seq_tis", old, tis_cap=2.0)
    assert capped == pytest.approx(2 * (math.exp(0.5) + 2.0 + math.exp(-20.0)) / 6, rel=1e-12)
    assert LossConfig(method="seq_tis").truncation_cap() == 5.0 and LossConfig(method="tis").truncation_cap() == 2.0


def test_icepop_masks_both_sides():
    # old - mu per token: 0 (w = 1, kept), -1 (0.37 < 0.5: masked), 1.5 (4.48, kept), 2.0 (7.39 > 5: masked).
    old = [[-1.0, -2.0], [0.5, 1.0]]
    weights = [[1.0, 0.0], [math.exp(1.5), 0.0]]
    loss, metrics, grad = _correction("icepop", old)
    assert loss == pytest.approx(sum(map(sum, weights)) / 4, rel=1e-12)
    assert grad.tolist() == [pytest.approx([w / 4 for w in row], rel=1e-12) for row in weights]
    assert metrics["icepop_masked_frac"] == pytest.approx(2 / 4)
    assert _correction("icepop", [[-1.0, -1.0]], icepop_low=1.0)[0] == 1.0  # w = 1 at the bound: kept
    assert _correction("icepop", [[-1.0, -2.0]], icepop_low=0.3)[0] == pytest.approx((1 + math.exp(-1.0)) / 2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_an_empty_micro_batch_gives_zero_loss(method):
    empty = torch.zeros(0, 3, dtype=torch.float64)
    lp = empty.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, empty, torch.zeros(0, dtype=torch.float64), empty, LossConfig(method=method),
                                old_logprobs=empty, ref_logprobs=empty)
    assert loss.item() == 0.0
    loss.backward()
    assert metrics["loss"] == 0.0


def _two_calls(seed: int, calls) -> list:
    """``(loss, gradient, metrics)`` of ``policy_loss`` on the same random inputs, once per ``calls`` entry (the
    config and the keyword arguments of that call; ``"old"`` stands for a second set of logprobs)."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    mu = logp + 0.1 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    other = logp + 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    adv, mask = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.rand(3, 4, generator=gen) > 0.2
    results = []
    for cfg, kwargs in calls:
        lp = logp.clone().requires_grad_(True)
        kwargs = {name: other if value == "old" else value for name, value in kwargs.items()}
        loss, metrics = policy_loss(lp, mu, adv, mask, cfg, **kwargs)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    return results


@pytest.mark.parametrize("method", ALL_METHODS)
def test_the_training_pass_gets_the_same_loss_and_gradient_without_metrics(method):
    cfg = LossConfig(method=method, kl_coef=0.01)
    results = _two_calls(5, [(cfg, dict(old_logprobs="old", ref_logprobs="old", with_metrics=flag))
                             for flag in (True, False)])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2]["loss"] == float(results[0][0]) and results[1][2] == {}


# ------------------------------------------------------------------------------------------- KL to the reference


def test_kl_coef_zero_changes_nothing():
    results = _two_calls(3, [(LossConfig(), {}), (LossConfig(), {"ref_logprobs": "old"})])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert "kl_ref_mean" not in results[0][2] and results[1][2]["kl_ref_mean"] > 0


@pytest.mark.parametrize("estimator,alias", [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")])
def test_kl_estimators_hand_computed(estimator, alias):
    # A = 0 and logprobs = mu: the surrogate is 0, the loss is kl_coef times the token mean of the estimator.
    # d = l - ref: 0.5, -1.0, 12 (k3: e^-12 + 12 - 1 = 11.00001 is clamped to 10).
    logp, ref = [[-1.0, -2.0, -1.0]], [[-1.5, -1.0, -13.0]]
    d = [0.5, -1.0, 12.0]
    by_hand = {"k1": [x for x in d], "k2": [0.5 * x * x for x in d],
               "k3": [min(math.exp(-x) + x - 1, 10.0) for x in d]}[estimator]
    slope = {"k1": [1.0] * 3, "k2": d, "k3": [1 - math.exp(-x) if math.exp(-x) + x - 1 < 10 else 0.0 for x in d]}
    for name in (estimator, alias):
        lp = t(logp, requires_grad=True)
        loss, metrics = policy_loss(lp, t(logp), t([0.0]), t([[1, 1, 1]]),
                                    LossConfig(method="alp_token", kl_coef=0.1, kl_estimator=name),
                                    ref_logprobs=t(ref))
        assert loss.item() == pytest.approx(0.1 * sum(by_hand) / 3, rel=1e-12)
        assert metrics["kl_ref_mean"] == pytest.approx(sum(by_hand) / 3, rel=1e-12)
        loss.backward()
        assert lp.grad.tolist() == [pytest.approx([0.1 * g / 3 for g in slope[estimator]], rel=1e-12, abs=1e-15)]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_ignores_garbage_in_padding(estimator):
    for garbage in (float("nan"), float("inf"), float("-inf")):
        lp = t([[-1.0, garbage]], requires_grad=True)
        loss, metrics = policy_loss(lp, t([[-1.0, garbage]]), t([0.5]), t([[1, 0]]),
                                    LossConfig(kl_coef=0.1, kl_estimator=estimator), ref_logprobs=t([[-1.5, garbage]]))
        loss.backward()
        assert math.isfinite(loss.item()) and math.isfinite(metrics["kl_ref_mean"])
        assert math.isfinite(lp.grad[0, 0].item()) and lp.grad[0, 1].item() == 0.0


def test_kl_needs_the_reference_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig(kl_coef=0.001))


def test_gspo_hand_computed():
    # Geometric mean of log(pi/pi_old): row 0: (0.001 + 0.0002 - 0.0006) / 3 = 0.0002 (inside [1-3e-4, 1+4e-4]);
    # row 1: (0.002 + 0.004) / 2 = 0.003 (1.003 > 1.0004, A > 0: clipped, no gradient).
    old = [[-1.0, -2.0, -3.0], [-1.0, -0.5, 0.0]]
    diff = [[0.001, 0.0002, -0.0006], [0.002, 0.004, 0.0]]
    logp = [[o + d for o, d in zip(orow, drow)] for orow, drow in zip(old, diff)]
    adv = [1.0, 2.0]
    s0, s1 = math.exp(0.0002), math.exp(0.003)
    losses = [[ref_token_loss(1.0, s0, 3e-4, 4e-4)] * 3, [ref_token_loss(2.0, s1, 3e-4, 4e-4)] * 3]
    assert losses[1][0] == pytest.approx(-2.0 * 1.0004)
    lp = t(logp, requires_grad=True)
    loss, metrics = policy_loss(lp, t(old), t(adv), t(MASK), LossConfig(method="gspo"), old_logprobs=t(old))
    assert loss.item() == pytest.approx(token_mean(losses, MASK), rel=1e-12)
    assert metrics["ratio_seq_max"] == pytest.approx(s1, rel=1e-12)
    assert metrics["clip_frac_high"] == pytest.approx(2 / 5)
    loss.backward()
    assert lp.grad.tolist() == [pytest.approx([-s0 / 5] * 3, rel=1e-12), [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("method", ["grpo", "tis", "seq_tis", "mis", "token_mis", "icepop", "gspo"])
def test_missing_old_logprobs_names_it(method):
    with pytest.raises(ValueError, match=rf"'{method}'.*old_logprobs"):
        policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig(method=method))


# ------------------------------------------------------------------------------------------- edges


def test_log_ratio_clamp_edge():
    # With clipping and dual clip opened wide, only the clamp bounds the ratio: +25 -> e^20, -25 -> e^-20.
    cfg = LossConfig(method="alp_token", eps_high=1e12, eps_low=0.999999, dual_clip_c=1e12)
    lp = t([[25.0, -25.0, 0.5]], requires_grad=True)
    loss, metrics = policy_loss(lp, t([[0.0, 0.0, 0.0]]), t([1.0]), t([[1, 1, 1]]), cfg)
    expected = -(math.exp(20.0) + math.exp(-20.0) + math.exp(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["ratio_token_max"] == pytest.approx(math.exp(20.0), rel=1e-12)
    assert metrics["ratio_token_min"] == pytest.approx(math.exp(-20.0), rel=1e-12)
    loss.backward()
    assert lp.grad[0, :2].tolist() == [0.0, 0.0]  # clamped tokens carry no gradient
    assert lp.grad[0, 2].item() == pytest.approx(-math.exp(0.5) / 3)
    # A custom bound, and a sequence ratio beyond it.
    loss5, metrics5 = policy_loss(t([[3.0, 3.0]]), t([[0.0, 0.0]]), t([-1.0]), t([[1, 1]]),
                                  LossConfig(log_ratio_clamp=5.0, dual_clip_c=1e12))
    assert loss5.item() == pytest.approx(math.exp(5.0), rel=1e-12)
    assert metrics5["ratio_seq_max"] == pytest.approx(math.exp(5.0), rel=1e-12)


@pytest.mark.parametrize(
    "adv,ratio,expected_loss,has_grad",
    [
        (1.0, 3.99, -3.99, True),    # just below 1 + eps_high = 4
        (1.0, 4.01, -4.0, False),    # just above: clipped
        (-1.0, 0.51, 0.51, True),    # just above 1 - eps_low = 0.5
        (-1.0, 0.49, 0.5, False),    # just below: clipped
        (1.0, 0.49, -0.49, True),    # A > 0 is never clipped from below
        (-2.0, 9.9, 2.0 * 9.9, True),   # just below c = 10
        (-2.0, 10.1, 2.0 * 10.0, False),  # dual clip
        (-2.0, 1e6, 2.0 * 10.0, False),   # huge ratio, A < 0: bounded by -A c
    ],
)
def test_clip_and_dual_clip_edges(adv, ratio, expected_loss, has_grad):
    lp = t([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(lp, t([[0.0]]), t([adv]), t([[1]]), LossConfig(method="alp_token"))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    loss.backward()
    if has_grad:
        assert lp.grad.item() == pytest.approx(-adv * ratio, rel=1e-12)
    else:
        assert lp.grad.item() == 0.0
    clipped = metrics["clip_frac_low"] + metrics["clip_frac_high"] + metrics["dual_clip_frac"]
    assert clipped == (0.0 if has_grad else 1.0)
    assert metrics["dual_clip_frac"] == (1.0 if ratio > 10 else 0.0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_rows_and_garbage_padding_are_ignored(method):
    # A fully masked row with -inf / NaN logprobs must change nothing and produce no NaN gradient.
    logp = t([[-1.0, -0.5], [float("-inf"), float("nan")]])
    mu = t([[-1.1, -0.4], [float("nan"), float("-inf")]])
    old = t([[-1.05, -0.45], [float("nan"), 0.0]])
    lp = logp.clone().requires_grad_(True)
    for agg in ("token_mean", "seq_mean_token_mean"):
        cfg = LossConfig(method=method, agg=agg)
        loss, metrics = policy_loss(lp, mu, t([0.8, -3.0]), t([[1, 1], [0, 0]]), cfg, old_logprobs=old)
        ref, _ = policy_loss(logp[:1], mu[:1], t([0.8]), t([[1, 1]]), cfg, old_logprobs=old[:1])
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(grad).all() and torch.all(grad[1] == 0)
        assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_zero_token_batch_gives_zero_loss_with_grad(agg):
    lp = t([[-1.0, float("-inf")]], requires_grad=True)
    loss, metrics = policy_loss(lp, t([[0.0, 0.0]]), t([1.0]), t([[0, 0]]), LossConfig(agg=agg))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert lp.grad.tolist() == [[0.0, 0.0]]
    assert metrics["loss"] == 0.0 and math.isnan(metrics["ratio_seq_max"])


def test_global_denominator():
    per_token = t([[1.0, 2.0], [3.0, 0.0]])
    mask = t([[1, 1], [1, 0]]).bool()
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(per_token, mask, "token_mean", global_denominator=12.0).item() == pytest.approx(0.5)
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 3.0) / 2)
    assert aggregate(per_token, mask, "seq_mean_token_mean", global_denominator=3.0).item() == pytest.approx(1.5)
    garbage = per_token.clone()
    garbage[1, 1] = float("nan")  # masked out: must not reach the sum
    assert aggregate(garbage, mask, "token_mean").item() == pytest.approx(2.0)
    assert aggregate(garbage, mask, "seq_mean_token_mean").item() == pytest.approx(2.25)
    full, _ = policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig())
    halves = [policy_loss(t(LOGP)[i : i + 1], t(MU)[i : i + 1], t(ADV)[i : i + 1], t(MASK)[i : i + 1],
                          LossConfig(), global_denominator=5.0)[0] for i in range(2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(full.item(), rel=1e-12)


def test_low_precision_inputs_are_upcast():
    lp = t(LOGP).to(torch.bfloat16).requires_grad_(True)
    loss, _ = policy_loss(lp, t(MU).to(torch.bfloat16), t(ADV).float(), t(MASK), LossConfig())
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_keys():
    _, without_old = policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig())
    for key in ("loss", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_token_mean",
                "ratio_seq_p999", "ratio_seq_max", "ratio_token_p0.1", "ratio_token_p50", "ratio_seq_min"):
        assert key in without_old
    assert not any(k.startswith("mismatch_") for k in without_old)
    assert all(type(v) is float for v in without_old.values())
    old = [[v + 0.1 for v in row] for row in MU]
    _, with_old = policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig(), old_logprobs=t(old))
    assert with_old["mismatch_k1"] == pytest.approx(-0.1, rel=1e-9)
    assert with_old["train_rollout_logprob_abs_diff"] == pytest.approx(0.1, rel=1e-9)
    assert with_old["mismatch_k3"] == pytest.approx(math.exp(0.1) - 1 - 0.1, rel=1e-9)
    tokens = [sum(row) for row in MASK if sum(row)]  # pi_old / mu of a sequence: exp(0.1 per masked-in token)
    assert with_old["mismatch_ratio_seq_max"] == pytest.approx(math.exp(0.1 * max(tokens)), rel=1e-9)
    assert with_old["mismatch_ratio_seq_min"] == pytest.approx(math.exp(0.1 * min(tokens)), rel=1e-9)
    # ALP's loss does not read old_logprobs: only the metrics change.
    assert with_old["loss"] == without_old["loss"]


# ------------------------------------------------------------------------------------------- config + registry


def test_clip_defaults_per_method():
    assert LossConfig().clip_range() == (0.5, 3.0)
    assert LossConfig(method="bypass").clip_range() == (0.5, 3.0)
    assert LossConfig(method="alp_token").clip_range() == (0.5, 3.0)
    for method in ("grpo", "tis", "seq_tis", "mis", "token_mis", "icepop"):
        assert LossConfig(method=method).clip_range() == (0.2, 0.28)
    assert LossConfig(method="gspo").clip_range() == (3e-4, 4e-4)
    assert LossConfig(method="grpo", eps_high=0.4).clip_range() == (0.2, 0.4)
    explicit = LossConfig.for_method("grpo", agg="seq_mean_token_mean")
    assert (explicit.eps_low, explicit.eps_high, explicit.agg) == (0.2, 0.28, "seq_mean_token_mean")
    assert LossConfig.for_method("alp_seq", eps_low=0.3).clip_range() == (0.3, 3.0)
    cfg = LossConfig()
    assert (cfg.dual_clip_c, cfg.log_ratio_clamp, cfg.tis_cap, cfg.mis_low, cfg.mis_high) == (
        10.0, 20.0, None, 0.0, 5.0)
    assert (cfg.mis_weight, cfg.icepop_low, cfg.icepop_high, cfg.kl_coef, cfg.kl_estimator) == (
        "importance", 0.5, 5.0, 0.0, "k3")
    with pytest.raises(Exception):
        cfg.method = "grpo"  # frozen


@pytest.mark.parametrize(
    "kwargs,field,fix_hint",
    [
        ({"method": "ppo"}, "loss.method", "alp_seq"),
        ({"agg": "sum"}, "loss.agg", "token_mean"),
        ({"eps_low": 0.0}, "loss.eps_low", "between 0 and 1"),
        ({"eps_low": 1.0}, "loss.eps_low", "between 0 and 1"),
        ({"eps_high": 0.0}, "loss.eps_high", "positive"),
        ({"eps_high": -1.0}, "loss.eps_high", "positive"),
        ({"dual_clip_c": 1.0}, "loss.dual_clip_c", "above 1"),
        ({"log_ratio_clamp": 0.0}, "loss.log_ratio_clamp", "positive"),
        ({"tis_cap": 0.0}, "loss.tis_cap", "positive"),
        ({"mis_low": -0.1}, "loss.mis_low", ">= 0"),
        ({"mis_low": 5.0, "mis_high": 5.0}, "loss.mis_high", "mis_low < mis_high"),
        ({"mis_low": 2.0, "mis_high": 1.0}, "loss.mis_high", "mis_low < mis_high"),
        ({"mis_weight": "binary"}, "loss.mis_weight", "indicator"),
        ({"icepop_low": 5.0, "icepop_high": 0.5}, "loss.icepop_high", "icepop_low < icepop_high"),
        ({"icepop_low": -1.0}, "loss.icepop_low", ">= 0"),
        ({"kl_coef": -0.001}, "loss.kl_coef", ">= 0"),
        ({"kl_coef": float("inf")}, "loss.kl_coef", ">= 0"),
        ({"kl_estimator": "k4"}, "loss.kl_estimator", "low_var_kl"),
        ({"method": "grpo", "seq_ratio_geometric_mean": True}, "loss.seq_ratio_geometric_mean", "alp_seq"),
        ({"eps_low": float("nan")}, "loss.eps_low", "between 0 and 1"),
    ],
)
def test_bad_config_names_field_and_fix(kwargs, field, fix_hint):
    with pytest.raises(ConfigError) as info:
        LossConfig(**kwargs)
    assert info.value.field == field
    assert field in str(info.value) and fix_hint in str(info.value)


def test_registry():
    assert set(ALL_METHODS) <= set(loss_methods())
    with pytest.raises(ValueError, match="already registered"):
        register_loss("grpo", eps_low=0.2, eps_high=0.2)(lambda x, cfg: None)
    with pytest.raises(ConfigError) as info:
        get_loss_method("dapo")
    for name in ALL_METHODS:
        assert name in info.value.fix


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(t(LOGP), t(MU), t([ADV]).T, t(MASK), LossConfig())
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(t(LOGP), t(MU)[:, :2], t(ADV), t(MASK), LossConfig())
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(t(LOGP), t(MU), t(ADV), t(MASK), LossConfig(method="grpo"), old_logprobs=t(MU)[:1])


@pytest.mark.parametrize("method", loss_methods())
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_a_fully_masked_sample_adds_no_loss_and_no_gradient(method, agg):
    """A void multi-turn trajectory (every loss-mask bit 0) still counts in its group's advantage, but adds
    nothing to the loss or its gradient, whatever its logprobs, under every method."""
    torch.manual_seed(0)
    logprobs = (-torch.rand(3, 5) - 0.1).requires_grad_()
    rollout = logprobs.detach() + 0.1 * torch.randn(3, 5)
    old = logprobs.detach() + 0.05 * torch.randn(3, 5)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 5)
    mask[1] = 0.0  # the void one
    cfg = LossConfig(method=method, agg=agg)
    loss, _ = policy_loss(logprobs, rollout, advantages, mask, cfg, old_logprobs=old)
    loss.backward()
    assert torch.all(logprobs.grad[1] == 0)
    keep = torch.tensor([0, 2])
    alone, _ = policy_loss(logprobs.detach()[keep], rollout[keep], advantages[keep], mask[keep], cfg,
                           old_logprobs=old[keep])
    assert float(loss) == pytest.approx(float(alone), rel=1e-6)
