"""Policy losses: ALP (ALP.md §3) and the baselines shipped beside it (§4), in one registry.

Every method is the same clipped surrogate; only the log-ratio (numerator / denominator) and a detached
per-token weight differ::

    clamp log_ratio to [-log_ratio_clamp, log_ratio_clamp];  r = exp(log_ratio)
    L1 = -A r;   L2 = -A clip(r, 1 - eps_low, 1 + eps_high);   Lc = max(L1, L2)
    dual clip:   L = min(Lc, -A c) where A < 0,  L = Lc elsewhere
    L <- L * weight                       (the rollout corrections below: tis, seq_tis, mis, token_mis, icepop)
    loss = token-mean of L over the masked-in tokens (or the sequence-mean of per-sequence token-means)
    loss += kl_coef * the same mean of KL_t(l_t, ref_t)   (kl_coef > 0: to a frozen reference model)

The methods (``loss_methods()`` lists them; ``register_loss`` adds one). ``l`` = ``logprobs`` (from the
perturbed training forward for ALP), ``mu`` = ``rollout_logprobs`` (the inference engine's), ``old`` =
``old_logprobs`` (the trainer's unperturbed recomputation, pi_old), ``m`` the loss mask, ``sg`` stop-gradient,
``B`` = ``log_ratio_clamp`` (20, the authors' safety bound). The rollout corrections weigh grpo's loss by the
importance weight of pi_old against the engine, per token ``w_t = exp(clamp(old_t - mu_t, -B, B))`` or per
sequence ``w = exp(clamp(sum_t m_t (old_t - mu_t), -B, B))``, always detached (clamped before the bounds below
apply, as in the authors' code: a weight beyond e^B is treated as e^B):

- ``alp_seq``: S = sum_t m_t (l_t - mu_t) (or S / sum_t m_t); log_ratio_t = sg(S) + l_t - sg(l_t). The value is
  the whole-sequence ratio, the gradient flows per token.
- ``bypass``: the same loss; "ALP with the perturbation off" differs only in the model forward.
- ``alp_token``: log_ratio_t = l_t - mu_t.
- ``grpo``: log_ratio_t = l_t - old_t.
- ``tis``: grpo times min(w_t, tis_cap) (token TIS; cap 2).
- ``seq_tis``: grpo times min(w, tis_cap) for every token of the sequence (the authors' ``run_exp_tis.sh``
  default level; cap 5).
- ``mis``: grpo times w * 1[mis_low <= w <= mis_high] for every token of the sequence (the authors' multi-turn
  ``train_mis.sh``, "mask" mode; default [0, 5]): kept sequences keep their weight, the others get 0.
  ``mis_weight="indicator"`` keeps them with weight 1 instead.
- ``token_mis``: the same per token with w_t (the paper's Token-MIS).
- ``icepop``: grpo times w_t * 1[icepop_low <= w_t <= icepop_high] (IcePop, Ring-1T: tokens whose
  train/inference probability ratio leaves [0.5, 5] get no loss and no gradient); token_mis with its own bounds.
- ``gspo``: log s = sum_t m_t (l_t - old_t) / sum_t m_t;  log_ratio_t = sg(log s) + l_t - sg(l_t).

Rejected sequences or tokens (mis, token_mis, icepop) stay in the loss's denominator, as in the authors' code,
where they are an importance weight of 0: masking many shrinks the step rather than inflating the rest.

KL to the reference model (verl's estimators, d_t = l_t - ref_t): ``k1`` = d_t; ``k2`` = d_t^2 / 2;
``k3`` ("low_var_kl") = clamp(exp(-d_t) + d_t - 1, -10, 10) with d_t clamped to [-B, B] first.

Clip defaults per method: ``LossConfig.eps_low`` / ``eps_high`` default to ``None``, meaning "the method's
default", resolved by ``LossConfig.clip_range()`` from the registry: alp_seq / alp_token / bypass 0.5 / 3.0
(ALP.md §3), grpo and the rollout corrections 0.2 / 0.28 (§4), gspo 3e-4 / 4e-4 (the GSPO paper's and the ALP
reference scripts' values: a geometric-mean ratio moves far less than a token ratio, so 0.2 / 0.28 would never
clip). ``LossConfig.for_method(name)`` writes the resolved values into the config explicitly. The dual-clip
constant c = 10 is shared by all methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    metrics: method-specific floats, computed when called (each float is a device sync on a GPU, so the
        training pass, which reports nothing per micro-batch, never calls it).
    """

    log_ratio: torch.Tensor
    seq_log_ratio: torch.Tensor
    weight: Optional[torch.Tensor] = None
    metrics: Callable[[], dict[str, float]] = dict


@dataclass(frozen=True)
class LossMethod:
    name: str
    ratio: Callable[[LossInputs, "LossConfig"], RatioTerms]
    eps_low: float
    eps_high: float
    needs_old_logprobs: bool
    unperturbed: bool  # a baseline: its numerator is the unperturbed policy (the ALP perturbation must be off)
    tis_cap: Optional[float] = None  # the method's default truncation cap (tis, seq_tis)


_LOSSES: dict[str, LossMethod] = {}


def register_loss(name: str, *, eps_low: float, eps_high: float, needs_old_logprobs: bool = False,
                  unperturbed: bool = False, tis_cap: Optional[float] = None):
    """Decorator registering ``fn(inputs: LossInputs, cfg: LossConfig) -> RatioTerms`` as loss ``name``.

    ``eps_low`` / ``eps_high`` are the method's default clip range; ``unperturbed``: a baseline whose
    numerator must come from the unperturbed model (a run refuses it with the ALP perturbation on);
    ``tis_cap``: the method's default truncation cap. Refuses a name already taken.
    """

    def add(fn: Callable[[LossInputs, "LossConfig"], RatioTerms]):
        if name in _LOSSES:
            raise ValueError(
                f"loss method {name!r} is already registered (by {_LOSSES[name].ratio.__qualname__}); "
                "register yours under another name"
            )
        _LOSSES[name] = LossMethod(name, fn, eps_low, eps_high, needs_old_logprobs, unperturbed, tis_cap)
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


MIS_WEIGHTS = ("importance", "indicator")


def _check_bounds(name: str, low: float, high: float, default: str) -> None:
    if not (math.isfinite(low) and low >= 0.0):
        raise ConfigError(f"loss.{name}_low", f"{low} is not a finite number >= 0",
                          f"set a value >= 0 (0: no lower bound; default {default})")
    if not high > low:
        raise ConfigError(f"loss.{name}_high", f"{name}_high={high} is not above {name}_low={low}",
                          f"set {name}_low < {name}_high (default {default})")


# KL to the reference model, per token (verl's ``kl_penalty``): d = logprobs - ref_logprobs.
def _kl_k1(logprobs: torch.Tensor, ref: torch.Tensor, bound: float) -> torch.Tensor:
    return logprobs - ref


def _kl_k2(logprobs: torch.Tensor, ref: torch.Tensor, bound: float) -> torch.Tensor:
    return 0.5 * (logprobs - ref).square()


def _kl_k3(logprobs: torch.Tensor, ref: torch.Tensor, bound: float) -> torch.Tensor:
    d = (ref - logprobs).clamp(-bound, bound)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


KL_ESTIMATORS = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}
KL_ESTIMATOR_NAMES = {"k1": "k1", "k2": "k2", "k3": "k3", "kl": "k1", "mse": "k2", "low_var_kl": "k3"}


@dataclass(frozen=True)
class LossConfig:
    """Options of the policy loss (see the module docstring for the formulas).

    ``eps_low`` / ``eps_high``: None = the method's default clip range (``clip_range()``).
    ``seq_ratio_geometric_mean``: alp_seq / bypass only: S / sum_t m_t instead of S.
    ``tis_cap``: tis and seq_tis; None = the method's default (tis 2, seq_tis 5; ``truncation_cap()``).
    ``mis_low`` / ``mis_high``: mis and token_mis (mis_low may be 0: no lower bound). ``mis_weight``:
    "importance" (kept sequences or tokens weighted by w, as the authors run it) or "indicator" (by 1).
    ``icepop_low`` / ``icepop_high``: icepop's bounds. ``kl_coef``: weight of the KL to the frozen reference
    model (0: none, and no reference model is built); ``kl_estimator``: k1, k2 or k3 (verl's kl, mse and
    low_var_kl are accepted as those).
    """

    method: str = "alp_seq"
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    dual_clip_c: float = 10.0
    log_ratio_clamp: float = 20.0
    tis_cap: Optional[float] = None
    mis_low: float = 0.0
    mis_high: float = 5.0
    mis_weight: str = "importance"
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    agg: str = "token_mean"
    seq_ratio_geometric_mean: bool = False
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

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
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ConfigError("loss.tis_cap", f"{self.tis_cap} is not > 0",
                              "set a positive cap, or leave it unset for the method's default (tis 2, seq_tis 5)")
        _check_bounds("mis", self.mis_low, self.mis_high, "[0, 5]")
        _check_bounds("icepop", self.icepop_low, self.icepop_high, "[0.5, 5]")
        if self.mis_weight not in MIS_WEIGHTS:
            raise ConfigError("loss.mis_weight", f"unknown weight {self.mis_weight!r}",
                              f"use one of {', '.join(MIS_WEIGHTS)} (importance: as the authors run mis)")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0.0):
            raise ConfigError("loss.kl_coef", f"{self.kl_coef} is not a finite number >= 0",
                              "use 0 for no KL to the reference model, or e.g. 0.001 (the authors' single-turn value)")
        if self.kl_estimator not in KL_ESTIMATOR_NAMES:
            raise ConfigError("loss.kl_estimator", f"unknown estimator {self.kl_estimator!r}",
                              f"use one of {', '.join(KL_ESTIMATOR_NAMES)}")
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

    def truncation_cap(self) -> Optional[float]:
        """The tis / seq_tis cap: the configured one, or the method's default where unset."""
        return get_loss_method(self.method).tis_cap if self.tis_cap is None else self.tis_cap

    def kl(self) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
        """The KL estimator ``kl(logprobs, ref_logprobs, log_ratio_clamp)`` of ``kl_estimator``."""
        return KL_ESTIMATORS[KL_ESTIMATOR_NAMES[self.kl_estimator]]

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


def _old_over_rollout(x: LossInputs, cfg: LossConfig, per_sequence: bool) -> torch.Tensor:
    """The importance weight of pi_old against the engine: ``[batch, seq]`` w_t, or ``[batch]`` w, clamped
    in log space to [-B, B] before exponentiating (no overflow)."""
    log_w = _masked(x.old_logprobs - x.rollout_logprobs, x.mask)
    if per_sequence:
        log_w = log_w.sum(dim=-1)
    bound = cfg.log_ratio_clamp
    return torch.exp(log_w.clamp(-bound, bound))


def _per_token(seq_values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return seq_values[:, None].expand_as(like)


def _truncated(x: LossInputs, cfg: LossConfig, per_sequence: bool) -> RatioTerms:
    terms = grpo(x, cfg)
    w = _old_over_rollout(x, cfg, per_sequence)
    cap = cfg.truncation_cap()
    weight = w.clamp(max=cap)
    counted = x.mask.any(dim=-1) if per_sequence else x.mask  # sequences with tokens, or tokens

    def metrics():
        return {"tis_weight_mean": float(stats.masked_mean(weight, counted)),
                "tis_clip_frac": stats.masked_fraction(w > cap, counted)}

    per_token = _per_token(weight, x.logprobs) if per_sequence else weight
    return RatioTerms(terms.log_ratio, terms.seq_log_ratio, per_token, metrics)


def _masked_importance(x: LossInputs, cfg: LossConfig, per_sequence: bool, low: float, high: float,
                       indicator: bool, name: str) -> RatioTerms:
    terms = grpo(x, cfg)
    w = _old_over_rollout(x, cfg, per_sequence)
    keep = (w >= low) & (w <= high)  # a weight exactly at a bound is kept
    weight = torch.where(keep, torch.ones_like(w) if indicator else w, torch.zeros_like(w))
    counted = x.mask.any(dim=-1) if per_sequence else x.mask

    def metrics():
        return {f"{name}_masked_frac": stats.masked_fraction(~keep, counted),
                f"{name}_weight_mean": float(stats.masked_mean(weight, counted))}

    per_token = _per_token(weight, x.logprobs) if per_sequence else weight
    return RatioTerms(terms.log_ratio, terms.seq_log_ratio, per_token, metrics)


@register_loss("tis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True, tis_cap=2.0)
def tis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Token TIS: grpo times the truncated token weight min(w_t, tis_cap), detached."""
    return _truncated(x, cfg, per_sequence=False)


@register_loss("seq_tis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True, tis_cap=5.0)
def seq_tis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Sequence TIS: grpo times min(w, tis_cap) on every token of the sequence (the authors' run_exp_tis.sh:
    sequence level, truncation at 5)."""
    return _truncated(x, cfg, per_sequence=True)


@register_loss("mis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def mis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Sequence MIS as the authors' train_mis.sh runs it ("mask" mode): grpo times w * 1[mis_low <= w <=
    mis_high] on every token of the sequence (times the indicator alone with mis_weight="indicator")."""
    return _masked_importance(x, cfg, True, cfg.mis_low, cfg.mis_high, cfg.mis_weight == "indicator", "mis")


@register_loss("token_mis", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def token_mis(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """Token MIS (the paper's Token-MIS): grpo times w_t * 1[mis_low <= w_t <= mis_high] per token."""
    return _masked_importance(x, cfg, False, cfg.mis_low, cfg.mis_high, cfg.mis_weight == "indicator", "mis")


@register_loss("icepop", eps_low=0.2, eps_high=0.28, needs_old_logprobs=True, unperturbed=True)
def icepop(x: LossInputs, cfg: LossConfig) -> RatioTerms:
    """IcePop (Ring-1T, arXiv 2510.18855): grpo times M(w_t) = w_t where icepop_low <= w_t <= icepop_high,
    0 elsewhere; w_t = pi_train(theta_old) / pi_infer(theta_old) per token."""
    return _masked_importance(x, cfg, False, cfg.icepop_low, cfg.icepop_high, False, "icepop")


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


def _check_inputs(logprobs, rollout_logprobs, advantages, loss_mask, old_logprobs, ref_logprobs) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"policy_loss: logprobs must be [batch, seq], got shape {tuple(logprobs.shape)}")
    named = {"rollout_logprobs": rollout_logprobs, "loss_mask": loss_mask, "old_logprobs": old_logprobs,
             "ref_logprobs": ref_logprobs}
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
    ref_logprobs: Optional[torch.Tensor] = None,
    global_denominator: Optional[float] = None,
    with_metrics: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of ``cfg.method`` and its metrics (``with_metrics=False``: an empty dict, and no device
    sync; the training pass reports the whole batch's metrics once, from its logprobs).

    Args:
        logprobs: ``[batch, seq]`` log pi_theta of the sampled tokens (perturbed for ALP); carries the gradient.
        rollout_logprobs: ``[batch, seq]`` the inference engine's log-probabilities mu (no gradient).
        advantages: ``[batch]`` one advantage per sequence (no gradient).
        loss_mask: ``[batch, seq]`` bool or 0/1; positions outside it may hold anything, even NaN.
        cfg: the loss options.
        old_logprobs: ``[batch, seq]`` the trainer's unperturbed, no-grad logprobs. Required by the methods that
            read pi_old (grpo, the rollout corrections, gspo); for every method, when given, the mismatch metrics
            are reported.
        ref_logprobs: ``[batch, seq]`` the frozen reference model's logprobs. Required when ``cfg.kl_coef > 0``
            (the KL term is added to the loss); when given, ``kl_ref_mean`` is reported.
        global_denominator: see ``aggregate``.

    Returns ``(loss, metrics)``: a 0-d tensor (float32, or logprobs' dtype if wider) and a dict of floats:
    ``loss``, ``clip_frac_low`` / ``clip_frac_high`` / ``dual_clip_frac`` (fractions of masked-in tokens where
    that clip sets the loss), ``ratio_token_mean``, ``ratio_token_*`` / ``ratio_seq_*`` quantiles of the loss's
    (clamped) ratio (``stats.ratio_quantiles``), ``mismatch_*`` when old_logprobs is given, ``kl_ref_mean`` (the
    token mean of the KL estimator) when ref_logprobs is given, and the method's own (tis / seq_tis:
    ``tis_weight_mean``, ``tis_clip_frac``; mis / token_mis: ``mis_masked_frac``, ``mis_weight_mean``; icepop:
    ``icepop_masked_frac``, ``icepop_weight_mean``; fractions of sequences for the sequence-level ones).
    """
    method = get_loss_method(cfg.method)
    _check_inputs(logprobs, rollout_logprobs, advantages, loss_mask, old_logprobs, ref_logprobs)
    if method.needs_old_logprobs and old_logprobs is None:
        raise ValueError(
            f"policy_loss: loss method {cfg.method!r} needs old_logprobs (the trainer's unperturbed recomputed "
            "logprobs, pi_old); pass old_logprobs=..."
        )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: loss.kl_coef > 0 needs ref_logprobs (the reference model's logprobs)")
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
    kl = None
    if ref_logprobs is not None:
        # estimated on masked inputs: padding may hold NaN / inf, and k2's backward multiplies by its input
        kl = cfg.kl()(_masked(inputs.logprobs, mask), _masked(ref_logprobs.detach().to(dtype), mask), bound)
        if cfg.kl_coef > 0:  # kl_coef = 0 leaves the loss exactly as without a reference
            loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.agg, global_denominator)

    if not with_metrics:
        return loss, {}
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
            metrics.update(stats.train_inference_ratio(inputs.old_logprobs, inputs.rollout_logprobs, mask, bound,
                                                       prefix="mismatch_ratio_seq_"))
        if kl is not None:
            metrics["kl_ref_mean"] = float(stats.masked_mean(kl.detach(), mask))
        metrics.update(terms.metrics())
    return loss, metrics
