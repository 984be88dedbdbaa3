"""Policy losses: ALP (ALP.md §3) and the baselines shipped beside it (§4), in one registry.

Every method is the same clipped surrogate; only the log-ratio (numerator / denominator) and a detached
per-token weight differ::

    clamp log_ratio to [-log_ratio_clamp, log_ratio_clamp];  r = exp(log_ratio)
    L1 = -A r;   L2 = -A clip(r, 1 - eps_low, 1 + eps_high);   Lc = max(L1, L2)
    dual clip:   L = min(Lc, -A c) where A < 0,  L = Lc elsewhere
    L <- L * weight                       (tis: truncated IS weight; mis: 0/1 sequence mask)
    loss = token-mean of L over the masked-in tokens (or the sequence-mean of per-sequence token-means)

The methods (``loss_methods()`` lists them; ``register_loss`` adds one):

- ``alp_seq``: S = sum_t m_t (l_t - mu_t) (or S / sum_t m_t); log_ratio_t = sg(S) + l_t - sg(l_t). The value is
  the whole-sequence ratio, the gradient flows per token. ``mu`` = ``rollout_logprobs`` (the inference
  engine's), ``l`` = ``logprobs`` from the perturbed training forward.
- ``bypass``: the same loss; "ALP with the perturbation off" differs only in the model forward.
- ``alp_token``: log_ratio_t = l_t - mu_t.
- ``grpo``: log_ratio_t = l_t - old_t (``old_logprobs``: the trainer's unperturbed recomputation).
- ``tis``: grpo times w_t = min(exp(old_t - mu_t), tis_cap).
- ``mis``: grpo, sequences with exp(sum_t m_t (old_t - mu_t)) outside [mis_low, mis_high] weighted 0.
- ``gspo``: log s = sum_t m_t (l_t - old_t) / sum_t m_t;  log_ratio_t = sg(log s) + l_t - sg(l_t).

Clip defaults per method: ``LossConfig.eps_low`` / ``eps_high`` default to ``None``, meaning "the method's
default", resolved by ``LossConfig.clip_range()`` from the registry: alp_seq / alp_token / bypass 0.5 / 3.0
(ALP.md §3), grpo / tis / mis 0.2 / 0.28 (§4), gspo 3e-4 / 4e-4 (the GSPO paper's and the ALP reference
scripts' values: a geometric-mean ratio moves far less than a token ratio, so 0.2 / 0.28 would never clip).
``LossConfig.for_method(name)`` writes the resolved values into the config explicitly. The dual-clip
constant c = 10 is shared by all methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from alp_megatron.alp import stats
from alp_megatron.errors import ConfigError

AGG_MODES = ("token_mean", "seq_mean_token_mean")
_GEOMETRIC_OPTION_METHODS = ("alp_seq", "bypass")


@dataclass(frozen=True)
class LossInputs:
    """What a method sees. Tensors ``[batch, seq]`` in the loss dtype; only ``logprobs`` carries gradient."""

    logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    mask: torch.Tensor  # bool

    def num_tokens(self) -> torch.Tensor:
        """``[batch]`` masked-in tokens per sequence, at least 1 (so empty rows divide safely)."""
        return self.mask.sum(dim=-1).clamp(min=1).to(self.logprobs.dtype)


@dataclass(frozen=True)
class RatioTerms:
    """What a method returns.

    log_ratio: ``[batch, seq]``, differentiable w.r.t. logprobs, 0 outside the mask, not yet clamped.
    seq_log_ratio: ``[batch]``, detached, the sequence-level log-ratio reported in the metrics.
    weight: ``[batch, seq]`` detached weight on the per-token loss, or None.
    metrics: method-specific floats.
    """

    log_ratio: torch.Tensor
    seq_log_ratio: torch.Tensor
    weight: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LossMethod:
    name: str
    ratio: Callable[[LossInputs, "LossConfig"], RatioTerms]
    eps_low: float
    eps_high: float
    needs_old_logprobs: bool
    unperturbed: bool  # a baseline: its numerator is the unperturbed policy (the ALP perturbation must be off)


_LOSSES: dict[str, LossMethod] = {}


def register_loss(name: str, *, eps_low: float, eps_high: float, needs_old_logprobs: bool = False,
                  unperturbed: bool = False):
    """Decorator registering ``fn(inputs: LossInputs, cfg: LossConfig) -> RatioTerms`` as loss ``name``.

    ``eps_low`` / ``eps_high`` are the method's default clip range; ``unperturbed``: a baseline whose
    numerator must come from the unperturbed model (a run refuses it with the ALP perturbation on).
    Refuses a name already taken.
    """

    def add(fn: Callable[[LossInputs, "LossConfig"], RatioTerms]):
        if name in _LOSSES:
            raise ValueError(
                f"loss method {name!r} is already registered (by {_LOSSES[name].ratio.__qualname__}); "
                "register yours under another name"
            )
        _LOSSES[name] = LossMethod(name, fn, eps_low, eps_high, needs_old_logprobs, unperturbed)
        return fn

    return add


def loss_methods() -> tuple[str, ...]:
    """Names of the registered loss methods, in registration order."""
    return tuple(_LOSSES)


def get_loss_method(name: str) -> LossMethod:
    """The registered method ``name``; ConfigError listing the choices on a miss."""
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            "loss.method", f"unknown loss method {name!r}", f"use one of {', '.join(loss_methods())}"
        ) from None


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss (see the module docstring for the formulas).

    ``eps_low`` / ``eps_high``: None = the method's default clip range (``clip_range()``).
    ``seq_ratio_geometric_mean``: alp_seq / bypass only: S / sum_t m_t instead of S.
    ``tis_cap``: tis only. ``mis_low`` / ``mis_high``: mis only (mis_low may be 0: no lower bound).
    """

    method: str = "alp_seq"
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    dual_clip_c: float = 10.0
    log_ratio_clamp: float = 20.0
    tis_cap: float = 2.0
    mis_low: float = 0.0
    mis_high: float = 5.0
    agg: str = "token_mean"
    seq_ratio_geometric_mean: bool = False

    def __post_init__(self) -> None:
        get_loss_method(self.method)
        if self.agg not in AGG_MODES:
            raise ConfigError("loss.agg", f"unknown aggregation {self.agg!r}", f"use one of {', '.join(AGG_MODES)}")
        if self.eps_low is not None and not 0.0 < self.eps_low < 1.0:
            raise ConfigError(
                "loss.eps_low", f"{self.eps_low} is not in (0, 1), so 1 - eps_low is no ratio",
                "set a value strictly between 0 and 1, or leave it unset for the method's default",
            )
        if self.eps_high is not None and not self.eps_high > 0.0:
            raise ConfigError(
                "loss.eps_high", f"{self.eps_high} is not > 0",
                "set a positive value, or leave it unset for the method's default",
            )
        if not self.dual_clip_c > 1.0:
            raise ConfigError("loss.dual_clip_c", f"{self.dual_clip_c} is not > 1", "set a value above 1 (default 10)")
        if not self.log_ratio_clamp > 0.0:
            raise ConfigError(
                "loss.log_ratio_clamp", f"{self.log_ratio_clamp} is not > 0", "set a positive bound (default 20)"
            )
        if not self.tis_cap > 0.0:
            raise ConfigError("loss.tis_cap", f"{self.tis_cap} is not > 0", "set a positive cap (default 2.0)")
        if not self.mis_low >= 0.0:
            raise ConfigError("loss.mis_low", f"{self.mis_low} is negative", "set a value >= 0 (0: no lower bound)")
        if not self.mis_high > self.mis_low:
            raise ConfigError(
                "loss.mis_high", f"mis_high={self.mis_high} is not above mis_low={self.mis_low}",
                "set mis_low < mis_high (default [0, 5])",
            )
        if self.seq_ratio_geometric_mean and self.method not in _GEOMETRIC_OPTION_METHODS:
            raise ConfigError(
                "loss.seq_ratio_geometric_mean", f"has no effect with method {self.method!r}",
                f"use it with {' or '.join(_GEOMETRIC_OPTION_METHODS)} (gspo is always geometric), or unset it",
            )

    def clip_range(self) -> tuple[float, float]:
        """``(eps_low, eps_high)``: the configured values, or the method's defaults where unset."""
        method = get_loss_method(self.method)
        eps_low = method.eps_low if self.eps_low is None else self.eps_low
        eps_high = method.eps_high if self.eps_high is None else self.eps_high
        return eps_low, eps_high

    @classmethod
    def for_method(cls, method: str, **overrides) -> "LossConfig":
        """A config for ``method`` with its default clip range written in (``overrides`` win)."""
        defaults = get_loss_method(method)
        overrides.setdefault("eps_low", defaults.eps_low)
        overrides.setdefault("eps_high", defaults.eps_high)
        return cls(method=method, **overrides)


# ---------------------------------------------------------------------------------------------------------
# The methods: each returns the log-ratio of its loss (and a weight). Shapes: [batch, seq] unless noted.


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not a product: padding may hold -inf / NaN logprobs, and 0 * inf is NaN (in backward too).
    return torch.where(mask, values, torch.zeros_like(values))


def _sequence_ratio_per_token(seq_log_ratio: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor):
    """sg(log_ratio_seq) + l_t - sg(l_t): every token's value is the sequence's, each token's gradient its own."""
    return _masked(seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach(), mask)


@register_loss("alp_seq", eps_low=0.5, eps_high=3.0)
def alp_seq(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """ALP, sequence level: ratio of the perturbed trainer to the inference engine over the whole response."""
    token_log_ratio = _masked(x.logprobs - x.rollout_logprobs, x.mask)
    seq_log_ratio = token_log_ratio.sum(dim=-1)  # S
    if cfg.seq_ratio_geometric_mean:
        seq_log_ratio = seq_log_ratio / x.num_tokens()
    log_ratio = _sequence_ratio_per_token(seq_log_ratio, x.logprobs, x.mask)
    return RatioTerms(log_ratio, seq_log_ratio.detach())


@register_loss("bypass", eps_low=0.5, eps_high=3.0, unperturbed=True)
def bypass(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Bypass = ALP with the perturbation off: the same loss as alp_seq, fed unperturbed logprobs."""
    return alp_seq(x, cfg)


@register_loss("alp_token", eps_low=0.5, eps_high=3.0)
def alp_token(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """ALP, token level: log_ratio_t = l_t - mu_t. The reported sequence ratio is the product over tokens."""
    log_ratio = _masked(x.logprobs - x.rollout_logprobs, x.mask)
    return RatioTerms(log_ratio, log_ratio.detach().sum(dim=-1))


@register_loss("grpo", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def grpo(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Decoupled PPO: token ratio pi_theta / pi_old; the rollout logprobs play no part in the loss."""
    log_ratio = _masked(x.logprobs - x.old_logprobs, x.mask)
    return RatioTerms(log_ratio, log_ratio.detach().sum(dim=-1))


@register_loss("tis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def tis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """grpo times the truncated token IS weight w_t = min(pi_old / mu, tis_cap), detached."""
    terms = grpo(x, cfg)
    old_log_ratio = _masked(x.old_logprobs - x.rollout_logprobs, x.mask)
    truncated = old_log_ratio > math.log(cfg.tis_cap)
    weight = torch.exp(old_log_ratio.clamp(max=math.log(cfg.tis_cap)))  # log space: no overflow before the cap
    metrics = {
        "tis_weight_mean": float(stats.masked_mean(weight, x.mask)),
        "tis_clip_frac": stats.masked_fraction(truncated, x.mask),
    }
    return RatioTerms(terms.log_ratio, terms.seq_log_ratio, weight, metrics)


@register_loss("mis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def mis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """grpo with sequences whose prod_t pi_old / mu lies outside [mis_low, mis_high] weighted 0.

    Masked sequences stay in the denominator (as in the reference code, where the mask is an IS weight of 0),
    so masking many sequences shrinks the step rather than inflating the rest.
    """
    terms = grpo(x, cfg)
    seq_is_log = _masked(x.old_logprobs - x.rollout_logprobs, x.mask).sum(dim=-1)
    log_low = math.log(cfg.mis_low) if cfg.mis_low > 0 else -math.inf
    keep = (seq_is_log >= log_low) & (seq_is_log <= math.log(cfg.mis_high))
    weight = keep[:, None].to(x.logprobs.dtype).expand_as(x.logprobs)
    has_tokens = x.mask.any(dim=-1)
    metrics = {"mis_masked_frac": stats.masked_fraction(~keep, has_tokens)}  # fraction of sequences
    return RatioTerms(terms.log_ratio, terms.seq_log_ratio, weight, metrics)


@register_loss("gspo", eps_low=3e-4, eps_high=4e-4, needs_old_logprobs=True, unperturbed=True)
def gspo(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """GSPO: the geometric-mean sequence ratio vs pi_old, in the same stop-gradient form as alp_seq."""
    seq_log_ratio = _masked(x.logprobs - x.old_logprobs, x.mask).sum(dim=-1) / x.num_tokens()
    log_ratio = _sequence_ratio_per_token(seq_log_ratio, x.logprobs, x.mask)
    return RatioTerms(log_ratio, seq_log_ratio.detach())


# ---------------------------------------------------------------------------------------------------------
# The shared surrogate.


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, agg: str, global_denominator: Optional[float] = None
) -> torch.Tensor:
    """Reduce ``[batch, seq]`` per-token losses to a scalar over the masked-in tokens.

    ``token_mean``: sum(L m) / sum(m). ``seq_mean_token_mean``: mean over the sequences with at least one
    masked-in token of their token-means. ``global_denominator`` replaces sum(m) (resp. the number of such
    sequences) when the mean runs over a global batch split into micro-batches: then summing the micro-batch
    losses gives the global mean. With nothing masked in the loss is 0, still attached to the graph.
    """
    mask = mask.bool()
    per_token_loss = _masked(per_token_loss, mask)
    if agg == "token_mean":
        numerator = per_token_loss.sum()
        count = mask.sum()
    elif agg == "seq_mean_token_mean":
        seq_tokens = mask.sum(dim=-1)
        numerator = (per_token_loss.sum(dim=-1) / seq_tokens.clamp(min=1).to(per_token_loss.dtype)).sum()
        count = (seq_tokens > 0).sum()
    else:
        raise ConfigError("loss.agg", f"unknown aggregation {agg!r}", f"use one of {', '.join(AGG_MODES)}")
    if global_denominator is not None:
        if not global_denominator > 0:
            raise ValueError(f"aggregate: global_denominator must be > 0, got {global_denominator}")
        return numerator / global_denominator
    return numerator / count.clamp(min=1).to(per_token_loss.dtype)


def _check_inputs(logprobs, rollout_logprobs, advantages, loss_mask, old_logprobs) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"policy_loss: logprobs must be [batch, seq], got shape {tuple(logprobs.shape)}")
    named = {"rollout_logprobs": rollout_logprobs, "loss_mask": loss_mask, "old_logprobs": old_logprobs}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"policy_loss: {name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}; they must match"
            )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"policy_loss: advantages must be [batch] = ({logprobs.shape[0]},) (one per sequence), "
            f"got shape {tuple(advantages.shape)}"
        )


def policy_loss(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: LossConfig,
    old_logprobs: Optional[torch.Tensor] = None,
    *,
    global_denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of ``cfg.method`` and its metrics.

    Args:
        logprobs: ``[batch, seq]`` log pi_theta of the sampled tokens (perturbed for ALP); carries the gradient.
        rollout_logprobs: ``[batch, seq]`` the inference engine's log-probabilities mu (no gradient).
        advantages: ``[batch]`` one advantage per sequence (no gradient).
        loss_mask: ``[batch, seq]`` bool or 0/1; positions outside it may hold anything, even NaN.
        cfg: the loss options.
        old_logprobs: ``[batch, seq]`` the trainer's unperturbed, no-grad logprobs. Required by grpo, tis,
            mis and gspo (their pi_old); for every method, when given, the mismatch metrics are reported.
        global_denominator: see ``aggregate``.

    Returns ``(loss, metrics)``: a 0-d tensor (float32, or logprobs' dtype if wider) and a dict of floats:
    ``loss``, ``clip_frac_low`` / ``clip_frac_high`` / ``dual_clip_frac`` (fractions of masked-in tokens where
    that clip sets the loss), ``ratio_token_mean``, ``ratio_token_*`` / ``ratio_seq_*`` quantiles of the loss's
    (clamped) ratio (``stats.ratio_quantiles``), ``mismatch_*`` when old_logprobs is given, and the method's own
    (tis: ``tis_weight_mean``, ``tis_clip_frac``; mis: ``mis_masked_frac``).
    """
    method = get_loss_method(cfg.method)
    _check_inputs(logprobs, rollout_logprobs, advantages, loss_mask, old_logprobs)
    if method.needs_old_logprobs and old_logprobs is None:
        raise ValueError(
            f"policy_loss: loss method {cfg.method!r} needs old_logprobs (the trainer's unperturbed recomputed "
            "logprobs, pi_old); pass old_logprobs=..."
        )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    mask = loss_mask.bool()
    inputs = LossInputs(
        logprobs=logprobs.to(dtype),
        rollout_logprobs=rollout_logprobs.detach().to(dtype),
        old_logprobs=None if old_logprobs is None else old_logprobs.detach().to(dtype),
        mask=mask,
    )
    terms = method.ratio(inputs, cfg)

    bound = cfg.log_ratio_clamp
    log_ratio = terms.log_ratio.clamp(-bound, bound)
    ratio = torch.exp(log_ratio)
    eps_low, eps_high = cfg.clip_range()
    adv = advantages.detach().to(dtype)[:, None]
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -adv * cfg.dual_clip_c)
    per_token_loss = torch.where(adv < 0, loss_dual, loss_ppo)
    if terms.weight is not None:
        per_token_loss = per_token_loss * terms.weight.detach()
    loss = aggregate(per_token_loss, mask, cfg.agg, global_denominator)

    with torch.no_grad():
        clip_active = loss_clipped > loss_unclipped
        metrics = {
            "loss": float(loss.detach()),
            "clip_frac_low": stats.masked_fraction(clip_active & (ratio < 1.0 - eps_low), mask),
            "clip_frac_high": stats.masked_fraction(clip_active & (ratio > 1.0 + eps_high), mask),
            "dual_clip_frac": stats.masked_fraction((adv < 0) & (loss_ppo > -adv * cfg.dual_clip_c), mask),
            "ratio_token_mean": float(stats.masked_mean(ratio.detach(), mask)),
        }
        seq_ratio = torch.exp(terms.seq_log_ratio.detach().clamp(-bound, bound))
        metrics.update(stats.ratio_quantiles(ratio.detach(), seq_ratio, mask))
        if inputs.old_logprobs is not None:
            metrics.update(stats.mismatch_kl(inputs.old_logprobs, inputs.rollout_logprobs, mask))
        metrics.update(terms.metrics)
    return loss, metrics
