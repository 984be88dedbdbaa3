"""A run's summary from its ``metrics.jsonl``: a table on stdout and a PNG of reward, the sequence-ratio tail,
the train-rollout mismatch (k3, mean absolute logprob difference, token staleness, partial samples) and sigma
per layer over the steps.

    python -m alp_megatron.report RUN_DIR [--every N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from alp_megatron.run.metrics import read_metrics

TABLE_COLUMNS = (("step", "{:>5d}"), ("reward_mean", "{:>7.3f}"), ("ratio_seq_p999", "{:>9.3f}"),
                 ("ratio_seq_max", "{:>9.3f}"), ("mismatch_k3", "{:>9.2e}"), ("sigma_mean", "{:>8.4f}"),
                 ("grad_norm", "{:>8.3f}"), ("time_step", "{:>6.1f}"))


def moving_average(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def table(records: list[dict], every: int = 1) -> str:
    """A fixed-width table of the key metrics, every ``every`` steps (and always the last)."""
    header = " ".join(f"{name:>{max(len(name), len(fmt.format(0)))}}" for name, fmt in TABLE_COLUMNS)
    lines = [header]
    for i, record in enumerate(records):
        if i % every and i != len(records) - 1:
            continue
        cells = []
        for name, fmt in TABLE_COLUMNS:
            width = max(len(name), len(fmt.format(0)))
            value = record.get(name)
            text = fmt.format(value + 1 if name == "step" else _number(value)) if value is not None else "-"
            cells.append(f"{text:>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: Optional[str] = None) -> str:
    """Write the four-panel PNG to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in records]
    figure, (reward_ax, ratio_ax, mismatch_ax, sigma_ax) = plt.subplots(1, 4, figsize=(20, 4))
    rewards = [_number(r.get("reward_mean")) for r in records]
    reward_ax.plot(steps, rewards, alpha=0.4, label="reward (step mean)")
    reward_ax.plot(steps, moving_average(rewards), label="5-step moving average")
    reward_ax.set(xlabel="step", ylabel="reward", title="reward")
    reward_ax.legend()
    for key in ("ratio_seq_p999", "ratio_seq_max"):
        ratio_ax.plot(steps, [_number(r.get(key)) for r in records], label=key)
    ratio_ax.set(xlabel="step", ylabel="pi_train / pi_rollout (sequence)", title="sequence-ratio tail")
    ratio_ax.set_yscale("log")
    ratio_ax.legend()
    for key in ("mismatch_k3", "train_rollout_logprob_abs_diff"):
        mismatch_ax.plot(steps, [_number(r.get(key)) for r in records], label=key)
    mismatch_ax.set(xlabel="step", ylabel="per token", title="train-rollout mismatch")
    mismatch_ax.set_yscale("log")
    mismatch_ax.legend(loc="upper left", fontsize="small")
    if any("staleness_token_mean" in r for r in records):  # async and partial rollouts, on a linear axis
        age_ax = mismatch_ax.twinx()
        for key, style in (("staleness_token_mean", "--"), ("partial_share", ":")):
            age_ax.plot(steps, [_number(r.get(key)) for r in records], style, color="gray", label=key)
        age_ax.set_ylabel("versions / share")
        age_ax.legend(loc="upper right", fontsize="small")
    layers = sorted({k for r in records for k in r if k.startswith("sigma_layer")}, key=lambda k: int(k[11:]))
    for key in layers:
        sigma_ax.plot(steps, [_number(r.get(key)) for r in records], label=key.replace("sigma_", ""))
    sigma_ax.set(xlabel="step", ylabel="sigma", title="ALP sigma per layer")
    if layers:
        sigma_ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summarize(run_dir: str, every: int = 5) -> tuple[str, str]:
    """Print-ready table and the plot path of the run in ``run_dir``."""
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not records:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no steps yet")
    return table(records, every), plot(records, os.path.join(run_dir, "summary.png"), title=run_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--every", type=int, default=5, help="print every N-th step")
    args = parser.parse_args(argv)
    text, path = summarize(args.run_dir, args.every)
    print(text)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
