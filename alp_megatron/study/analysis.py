"""An off-policy study's results, per regime: per-configuration numbers across seeds, a Markdown table, the
paper's claims checked against them with a one-line verdict per claim, and PNG plots (the P2-P98 envelope of the
sequence ratio per configuration, reward curves, sigma per layer).

Every number is read from the runs' ``metrics.jsonl``. The sequence ratio compared across methods is
``train_infer_ratio_seq_*`` (trained numerator over the engine's logprobs, the quantity ALP.md §1 is about),
not each loss's own ratio (grpo, tis, mis and gspo take theirs against the recomputed pi_old).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from alp_megatron.study.plan import ABLATIONS, StudyConfig

RATIO = "train_infer_ratio_seq_"
# The methods ALP claims to keep the ratio tail and the KL below (no perturbation; corrections or none).
BASELINES = ("bypass", "grpo", "tis", "seq_tis", "mis", "token_mis", "icepop")
FINAL_STEPS = 5  # the final reward of a run is its mean over the last FINAL_STEPS steps
# What each rollout correction truncated or masked, per step (policy_loss's metrics): a correction whose share
# stays 0 never engaged, and its method trained exactly as its uncorrected base did.
CORRECTED = ("tis_clip_frac", "mis_masked_frac", "icepop_masked_frac")


@dataclass(frozen=True)
class ConfigurationResult:
    """One configuration across its seeds (each number is the mean over seeds unless named otherwise)."""

    configuration: str
    seeds: int
    reward_final_mean: float
    reward_final_std: float  # across seeds
    reward_first: float  # step 1
    ratio_p999: float  # per run: the largest per-step p99.9 of the sequence ratio over training
    ratio_p999_std: float  # across seeds
    ratio_max: float  # the largest sequence ratio seen in any step of any seed
    ratio_p2_min: float  # per run: the smallest per-step p2
    k3_mean: float  # per run: the mean mismatch_k3 over steps
    k3_std: float  # across seeds
    k3_spike_steps: float  # per run: steps whose mismatch_k3 exceeds the threshold
    ratio_spike_steps: float  # per run: steps whose sequence ratio p99.9 (or 1 / p2) exceeds the threshold
    grad_spikes: float  # per run: steps whose largest gradient norm exceeds factor x the run's median
    corrected: Optional[float]  # the share of tokens (sequences) the method's correction truncated or masked
    sigma_end: Optional[float]  # mean sigma over layers at the last step (ALP configurations)


def finite_values(records: Sequence[dict], key: str) -> list[float]:
    """``key`` of each record that holds a finite number for it (the others are skipped)."""
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (a seed that lacks a number does not turn the whole mean into NaN)."""
    values = _finite(values)
    return statistics.fmean(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation across seeds; NaN with fewer than two (one seed has no spread)."""
    values = _finite(values)
    return statistics.stdev(values) if len(values) > 1 else math.nan


def configuration_result(configuration: str, runs: Sequence[list[dict]], study: StudyConfig) -> ConfigurationResult:
    finals, p999s, maxima, p2s, k3_means, k3_spikes, ratio_spikes, grad_spikes, sigmas, firsts, corrected = (
        [] for _ in range(11))
    spike = study.thresholds.seq_ratio_spike
    for records in runs:
        rewards = finite_values(records, "reward_mean")
        finals.append(finite_mean(rewards[-FINAL_STEPS:]))
        firsts.append(rewards[0] if rewards else math.nan)
        p999s.append(max(finite_values(records, RATIO + "p999"), default=math.nan))
        maxima.append(max(finite_values(records, RATIO + "max"), default=math.nan))
        p2s.append(min(finite_values(records, RATIO + "p2"), default=math.nan))
        k3 = finite_values(records, "mismatch_k3")
        k3_means.append(finite_mean(k3))
        k3_spikes.append(sum(1 for v in k3 if v > study.thresholds.mismatch_k3))
        ratio_spikes.append(sum(1 for r in records if float(r.get(RATIO + "p999", 1.0)) > spike
                                or float(r.get(RATIO + "p2", 1.0)) < 1.0 / spike))
        norms = finite_values(records, "grad_norm_max")
        median = statistics.median(norms) if norms else math.nan
        grad_spikes.append(sum(1 for v in norms if v > study.thresholds.grad_spike_factor * median))
        corrected += [value for key in CORRECTED for value in finite_values(records, key)]
        if records and records[-1].get("noise_ratio_mean") is not None:  # an ALP run: its sigmas moved
            sigmas.append(float(records[-1]["sigma_mean"]))
    return ConfigurationResult(
        configuration=configuration, seeds=len(runs), reward_final_mean=finite_mean(finals),
        reward_final_std=_std(finals), reward_first=finite_mean(firsts),
        ratio_p999=finite_mean(p999s), ratio_p999_std=_std(p999s), ratio_max=max(_finite(maxima), default=math.nan),
        ratio_p2_min=finite_mean(p2s), k3_mean=finite_mean(k3_means), k3_std=_std(k3_means),
        k3_spike_steps=finite_mean(k3_spikes), ratio_spike_steps=finite_mean(ratio_spikes),
        grad_spikes=finite_mean(grad_spikes), corrected=finite_mean(corrected) if corrected else None,
        sigma_end=finite_mean(sigmas) if sigmas else None,
    )


def results_by_configuration(runs: dict[str, list[list[dict]]], study: StudyConfig) -> list[ConfigurationResult]:
    """``runs``: ``{configuration: [records of each seed]}`` -> one result per configuration, in order."""
    return [configuration_result(name, seeds, study) for name, seeds in runs.items() if seeds]


def markdown_table(results: Sequence[ConfigurationResult], study: StudyConfig) -> str:
    thresholds = study.thresholds
    lines = [
        "| configuration | seeds | reward step 1 | final reward (mean ± std) | seq ratio p99.9 | seq ratio max | "
        f"seq ratio p2 | mismatch k3 (mean) | steps k3 > {thresholds.mismatch_k3:g} | "
        f"steps seq ratio outside 1/{thresholds.seq_ratio_spike:g}..{thresholds.seq_ratio_spike:g} | "
        f"grad-norm spikes (> {thresholds.grad_spike_factor:g}x median) | corrected share | sigma at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sigma = "-" if r.sigma_end is None else f"{r.sigma_end:.4f}"
        corrected = "-" if r.corrected is None else f"{r.corrected:.4f}"
        lines.append(
            f"| {r.configuration} | {r.seeds} | {r.reward_first:.3f} | {r.reward_final_mean:.3f} ± "
            f"{r.reward_final_std:.3f} | {r.ratio_p999:.3f} ± {r.ratio_p999_std:.3f} | {r.ratio_max:.3f} | "
            f"{r.ratio_p2_min:.3f} | {r.k3_mean:.2e} ± {r.k3_std:.1e} | {r.k3_spike_steps:.1f} | "
            f"{r.ratio_spike_steps:.1f} | {r.grad_spikes:.1f} | {corrected} | {sigma} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims (``kind``, a key of :data:`CLAIMS`) for ALP (``alp_seq``) against ``against``:
    ``holds`` True, False, or None (not shown), with the numbers as ``evidence``."""

    kind: str
    against: str
    holds: Optional[bool]
    evidence: str

    @property
    def text(self) -> str:
        return f"{CLAIMS[self.kind]} {self.against.replace('_', ' ') if self.kind == 'layers' else self.against}"


CLAIMS = {"tail": "ALP's sequence-ratio tail (p99.9) stays below that of",
          "kl": "ALP's train-inference KL (mismatch k3) stays below that of",
          "learns": "ALP learns at least as well as", "layers": "perturbing all layers beats"}


def claims(results: Sequence[ConfigurationResult]) -> list[Claim]:
    """The paper's claims (ALP.md §1) checked on these numbers.

    Every claim is judged against the seed spread: the larger of the two seed standard deviations of the
    number compared. ``holds`` is None (not shown) when a number is missing, when fewer than two seeds give no
    spread to judge by, or when the two differ by no more than the spread. "At least as well" holds when ALP's
    mean reward is no lower than the other's minus the spread (and fails otherwise); "beats" and "stays
    below" (the ratio tail, the KL) hold when ALP is better by more than the spread and fail when it is worse
    by more.
    """
    by_name = {r.configuration: r for r in results}
    alp = by_name.get("alp_seq")
    if alp is None:
        return []
    found = []
    baselines = [by_name[m] for m in BASELINES if m in by_name]
    for other in baselines:
        found.append(Claim("tail", other.configuration,
                           _better(other.ratio_p999 - alp.ratio_p999, alp.ratio_p999_std, other.ratio_p999_std),
                           f"{alp.ratio_p999:.3f} ± {alp.ratio_p999_std:.3f} vs "
                           f"{other.ratio_p999:.3f} ± {other.ratio_p999_std:.3f}"))
    for other in baselines:
        found.append(Claim("kl", other.configuration, _better(other.k3_mean - alp.k3_mean, alp.k3_std, other.k3_std),
                           f"{alp.k3_mean:.2e} ± {alp.k3_std:.1e} vs {other.k3_mean:.2e} ± {other.k3_std:.1e}"))
    for other in baselines + [by_name[m] for m in ("gspo", "alp_token") if m in by_name]:
        margin = _margin(alp, other)
        holds = None if math.isnan(margin) else alp.reward_final_mean >= other.reward_final_mean - margin
        found.append(Claim("learns", other.configuration, holds, _rewards(alp, other)))
    for name in ABLATIONS:
        if name in by_name:
            other = by_name[name]
            holds = _better(alp.reward_final_mean - other.reward_final_mean, alp.reward_final_std,
                            other.reward_final_std)
            found.append(Claim("layers", name, holds,
                               f"{_rewards(alp, other)}; seq ratio p99.9 {alp.ratio_p999:.3f} vs {other.ratio_p999:.3f}"))
    return found


def _better(advantage: float, *stds: float) -> Optional[bool]:
    """ALP's ``advantage`` (positive: ALP better) judged against the larger seed std: True or False beyond it,
    None within it or when a number or a spread (one seed) is missing."""
    margin = _spread(*stds)
    if math.isnan(advantage) or math.isnan(margin) or abs(advantage) <= margin:
        return None
    return advantage > 0


def _margin(a: ConfigurationResult, b: ConfigurationResult) -> float:
    """The larger seed standard deviation of the two final rewards (NaN with fewer than two seeds)."""
    if math.isnan(a.reward_final_mean) or math.isnan(b.reward_final_mean):
        return math.nan
    return _spread(a.reward_final_std, b.reward_final_std)


def _spread(*stds: float) -> float:
    """The largest of ``stds``; NaN when one is (a configuration with one seed has no spread)."""
    return math.nan if any(math.isnan(std) for std in stds) else max(stds)


def _rewards(a: ConfigurationResult, b: ConfigurationResult) -> str:
    return (f"final reward {a.reward_final_mean:.3f} ± {a.reward_final_std:.3f} vs "
            f"{b.reward_final_mean:.3f} ± {b.reward_final_std:.3f}")


def claims_markdown(found: Sequence[Claim]) -> str:
    verdict = {True: "yes", False: "no", None: "not shown (within the seed spread, or too few seeds)"}
    lines = ["| claim | holds here | evidence |", "|---|---|---|"]
    lines += [f"| {claim.text} | {verdict[claim.holds]} | {claim.evidence} |" for claim in found]
    return "\n".join(lines)


def verdicts(found: Sequence[Claim], gate_reached: bool) -> list[str]:
    """One line per kind of claim: against which configurations it held, failed, or was not shown; in a regime
    whose mismatch stayed below the gate every claim is untested there, whatever the numbers say."""
    lines = []
    for kind, opening in CLAIMS.items():
        outcomes: dict[Optional[bool], list[str]] = {True: [], False: [], None: []}
        for claim in found:
            if claim.kind == kind:
                outcomes[claim.holds].append(claim.against)
        if not any(outcomes.values()):
            continue
        if not gate_reached:
            lines.append(f"{opening} the others: untested here (the regime's mismatch stayed below the gate)")
            continue
        parts = [f"{label} {', '.join(outcomes[key])}" for key, label in
                 ((True, "holds against"), (False, "FAILS against"), (None, "not shown against")) if outcomes[key]]
        lines.append(f"{opening} the others: " + "; ".join(parts))
    return lines


def _moving_average(values: list[float], window: int = 5) -> list[float]:
    return [finite_mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _per_step(runs: Sequence[list[dict]], key: str) -> list[float]:
    """The mean over seeds of ``key`` at each step (steps every seed reached)."""
    steps = min(len(records) for records in runs)
    return [finite_mean([float(records[i].get(key, math.nan)) for records in runs]) for i in range(steps)]


def plot_all(runs: dict[str, list[list[dict]]], out_dir: str, regime: str = "") -> list[str]:
    """Write ``ratio_envelope.png``, ``reward.png`` and ``sigma.png`` (of ``regime``'s runs) into ``out_dir``;
    returns their paths."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, seeds in runs.items() if seeds]
    paths = []

    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        low, high, tail = (_per_step(runs[name], RATIO + key) for key in ("p2", "p98", "p999"))
        steps = list(range(1, len(low) + 1))
        ax.fill_between(steps, low, high, alpha=0.4, label="P2-P98")
        ax.plot(steps, tail, linewidth=0.8, label="p99.9")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("pi_train / pi_infer (sequence)")
    axes[0][0].legend(fontsize="small")
    figure.suptitle(f"{regime}: sequence ratio envelope per configuration (mean over seeds)".lstrip(": "))
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "ratio_envelope.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        per_seed = [_moving_average(finite_values(records, "reward_mean")) for records in runs[name]]
        steps = min(len(v) for v in per_seed)
        mean = [finite_mean([v[i] for v in per_seed]) for i in range(steps)]
        spread = [statistics.stdev([v[i] for v in per_seed]) if len(per_seed) > 1 else 0.0 for i in range(steps)]
        x = list(range(1, steps + 1))
        ax.plot(x, mean, label=name)
        ax.fill_between(x, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], alpha=0.1)
    ax.set(xlabel="step", ylabel="reward (5-step moving average, mean ± std over seeds)",
           title=f"{regime}: reward".lstrip(": "))
    ax.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "reward.png"))
    figure.savefig(paths[-1], dpi=90)
    plt.close(figure)

    perturbed = [n for n in names if runs[n][0] and runs[n][0][-1].get("noise_ratio_mean") is not None]
    if perturbed:
        figure, axes = plt.subplots(1, len(perturbed), figsize=(4 * len(perturbed), 3.2), squeeze=False)
        for ax, name in zip(axes[0], perturbed):
            layers = sorted({k for r in runs[name][0] for k in r if k.startswith("sigma_layer")},
                            key=lambda k: int(k[len("sigma_layer"):]))
            for key in layers:
                ax.plot(range(1, len(_per_step(runs[name], key)) + 1), _per_step(runs[name], key),
                        label=key.replace("sigma_", ""))
            ax.set(title=name, xlabel="step", ylabel="sigma")
            ax.legend(fontsize="x-small")
        figure.suptitle(f"{regime}: ALP sigma per layer (mean over seeds; layer L = the logits)".lstrip(": "))
        figure.tight_layout()
        paths.append(os.path.join(out_dir, "sigma.png"))
        figure.savefig(paths[-1], dpi=90)
        plt.close(figure)
    return paths
