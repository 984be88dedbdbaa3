"""Statistics of the importance ratio and of the train–inference mismatch (ALP.md §5).

Pure functions: tensors in, Python floats out (one host sync per call). They see only the tensors they are
given -- one micro-batch on one rank -- and know nothing of process groups; gathering across micro-batches or
ranks (for exact global quantiles) is the caller's business.

Key names (shared with the metrics file):

- ratio quantiles: ``{prefix}p0.1``, ``p1``, ``p2``, ``p50``, ``p98``, ``p99``, ``p999`` (= 99.9 %), ``max``,
  ``min``; the loss uses the prefixes ``ratio_token_`` and ``ratio_seq_``.
- mismatch: ``mismatch_k1``, ``mismatch_k3``, ``train_rollout_logprob_abs_diff``, and the quantiles of the
  sequence ratio ``pi_old / mu`` (``mismatch_ratio_seq_*``).
"""

from __future__ import annotations

import math

import torch

# (key suffix, quantile level). p999 is the 99.9th percentile; the name has no dot because it is a metrics key
# read elsewhere (metrics.jsonl); p0.1 keeps its dot because "p01" would read as the 1st percentile.
QUANTILE_LEVELS: tuple[tuple[str, float], ...] = (
    ("p0.1", 0.001),
    ("p1", 0.01),
    ("p2", 0.02),
    ("p50", 0.5),
    ("p98", 0.98),
    ("p99", 0.99),
    ("p999", 0.999),
)
QUANTILE_KEYS: tuple[str, ...] = tuple(name for name, _ in QUANTILE_LEVELS) + ("max", "min")


def _check_same_shape(values: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if values.shape != mask.shape:
        raise ValueError(
            f"{what}: values have shape {tuple(values.shape)} but the mask has shape {tuple(mask.shape)}; "
            "they must match"
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true, as a 0-d tensor (0 when nothing is masked in).

    ``values`` and ``mask`` have the same shape (any). Positions outside the mask are never read into the sum,
    so NaN / inf there do not leak into the result.
    """
    _check_same_shape(values, mask, "masked_mean")
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def masked_fraction(condition: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the masked-in positions where ``condition`` holds (0.0 when nothing is masked in)."""
    _check_same_shape(condition, mask, "masked_fraction")
    mask = mask.bool()
    hits = (condition.bool() & mask).sum()
    return float(hits / mask.sum().clamp(min=1))


def masked_quantiles(values: torch.Tensor, mask: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Quantiles (``QUANTILE_LEVELS``), max and min of ``values`` where ``mask`` is true.

    ``values`` and ``mask``: the same shape (any). Quantiles interpolate linearly between order statistics, as
    ``torch.quantile`` does by default, but via a sort so that there is no input-size limit. Returns
    ``{prefix + key: float}`` for every key of ``QUANTILE_KEYS``; all NaN when nothing is masked in (a quantile
    of nothing does not exist, and 0 would look like a real ratio).
    """
    _check_same_shape(values, mask, "masked_quantiles")
    keys = [prefix + key for key in QUANTILE_KEYS]
    with torch.no_grad():
        selected = values.detach()[mask.bool()].to(torch.float64)
        count = selected.numel()
        if count == 0:
            return dict.fromkeys(keys, math.nan)
        ordered, _ = torch.sort(selected)
        levels = torch.tensor([level for _, level in QUANTILE_LEVELS], dtype=torch.float64, device=ordered.device)
        position = levels * (count - 1)
        below = position.floor().long()
        above = position.ceil().long()
        weight = position - below.to(torch.float64)
        low, high = ordered[below], ordered[above]
        # where(), not lerp: keeps exact order statistics exact and inf from turning into NaN.
        quantiles = torch.where(weight == 0, low, low + (high - low) * weight)
        result = torch.cat([quantiles, ordered[-1:], ordered[:1]]).tolist()
    return dict(zip(keys, result))


def ratio_quantiles(token_ratio: torch.Tensor, seq_ratio: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, float]:
    """Token- and sequence-level quantiles of an importance ratio.

    ``token_ratio``: ``[batch, seq]``, read where ``loss_mask`` (``[batch, seq]``) is true.
    ``seq_ratio``: ``[batch]``, read for the sequences with at least one masked-in token.
    Returns the ``ratio_token_*`` and ``ratio_seq_*`` keys (see ``masked_quantiles``).
    """
    if seq_ratio.shape != token_ratio.shape[:1]:
        raise ValueError(
            f"ratio_quantiles: seq_ratio has shape {tuple(seq_ratio.shape)}, expected ({token_ratio.shape[0]},)"
        )
    mask = loss_mask.bool()
    metrics = masked_quantiles(token_ratio, mask, prefix="ratio_token_")
    metrics.update(masked_quantiles(seq_ratio, mask.any(dim=-1), prefix="ratio_seq_"))
    return metrics


def mismatch_kl(
    trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Train–inference mismatch of the sampled tokens, token-mean over the masked-in tokens.

    All inputs ``[batch, seq]``. ``trainer_logprobs``: the trainer's *unperturbed* log-probabilities;
    ``rollout_logprobs``: the inference engine's (``mu``). The tokens were sampled from the rollout policy, so
    with ``log_ratio = trainer - rollout`` the estimators of KL(pi_rollout || pi_trainer) are

    - ``mismatch_k1`` = mean(-log_ratio)                       (unbiased, can be negative)
    - ``mismatch_k3`` = mean(exp(log_ratio) - 1 - log_ratio)   (unbiased, never negative)
    - ``train_rollout_logprob_abs_diff`` = mean(|log_ratio|)   (slime's name for it)

    Computed in float64 (k3 exponentiates). All 0.0 when nothing is masked in.
    """
    _check_same_shape(trainer_logprobs, rollout_logprobs, "mismatch_kl")
    _check_same_shape(trainer_logprobs, mask, "mismatch_kl")
    with torch.no_grad():
        mask = mask.bool()
        log_ratio = (trainer_logprobs.detach().to(torch.float64) - rollout_logprobs.detach().to(torch.float64))
        log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
        count = mask.sum().clamp(min=1).to(torch.float64)
        k1 = (-log_ratio).sum() / count
        k3 = (torch.expm1(log_ratio) - log_ratio).sum() / count  # zero at masked-out positions (log_ratio = 0)
        abs_diff = log_ratio.abs().sum() / count
        k1, k3, abs_diff = torch.stack([k1, k3, abs_diff]).tolist()
    return {"mismatch_k1": k1, "mismatch_k3": k3, "train_rollout_logprob_abs_diff": abs_diff}


def train_inference_ratio(trained_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                          log_clamp: float = 20.0, prefix: str = "train_infer_ratio_seq_") -> dict[str, float]:
    """Quantiles of the sequence ratio ``pi_train / mu`` (``train_infer_ratio_seq_*``), whatever the loss.

    ``trained_logprobs``: the numerator the loss was trained with (perturbed for ALP), ``rollout_logprobs``:
    the engine's; all ``[batch, seq]``. For ALP and bypass this is the loss's own sequence ratio (unless
    ``loss.seq_ratio_geometric_mean``, which takes its per-token geometric mean); for grpo, tis, mis and gspo
    (whose loss ratio is against the recomputed pi_old) it is the same training-inference ratio, so methods
    can be compared on it. The log-ratio is clamped to ``[-log_clamp, log_clamp]``. Given the unperturbed
    ``pi_old`` as the numerator (``prefix="mismatch_ratio_seq_"``), it is the engine mismatch alone, before any
    update of the step and without ALP's noise.
    """
    _check_same_shape(trained_logprobs, rollout_logprobs, "train_inference_ratio")
    with torch.no_grad():
        valid = mask.bool()
        log_ratio = torch.where(valid, trained_logprobs.detach().double() - rollout_logprobs.detach().double(),
                                torch.zeros((), dtype=torch.float64))
        seq_ratio = log_ratio.sum(dim=-1).clamp(-log_clamp, log_clamp).exp()
        return masked_quantiles(seq_ratio, valid.any(dim=-1), prefix=prefix)
