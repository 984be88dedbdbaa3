"""Where an RL step of the CPU run spends its time, and what ALP costs against `bypass`, in one invocation.

    python benchmarks/loop_breakdown.py [--steps 12] [--out runs/bench_loop]
    python benchmarks/loop_breakdown.py --regimes [--steps 12]

Default: runs the embedded CPU config three times, one after the other, with the same seed: ALP (alp_seq,
perturbation on), bypass (same loss, perturbation off) and ALP with a KL to the reference model
(loss.kl_coef=0.001: one more forward-only pass per step, over the frozen reference). Prints, per run, the median
share of a step spent in rollout, training and weight sync (target: sync <= 5 %), the ALP / bypass ratio of median
step and train times, and the ALP+KL / ALP ratio.

``--regimes``: the off-policy regimes, each run of the same config with a bfloat16 engine on its own server
(disaggregated): synchronous, asynchronous with ``rollout.max_staleness`` 1, 2 and 4 (partial rollouts), and
synchronous with FP8-rounded rollout weights (``weight_sync.rollout_precision=fp8_rounded``). Prints per run the
median step time, its throughput against the synchronous run (samples per second), the shares of a step the
trainer waited for a rollout and the engine had no rollout to run, and the mismatch (k3, mean absolute
train-rollout logprob difference, token staleness, partial samples).

The first step of each run (start-up effects) is left out of the medians and means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from alp_megatron.run.metrics import read_metrics  # noqa: E402

VARIANTS = {"alp": ["loss.method=alp_seq", "alp.enabled=true"],
            "bypass": ["loss.method=bypass", "alp.enabled=false"],
            "alp+kl": ["loss.method=alp_seq", "alp.enabled=true", "loss.kl_coef=0.001"]}

_DISAGGREGATED_BF16 = ["rollout.mode=disaggregated", "rollout.server_dtype=bfloat16"]
REGIMES = {"sync": _DISAGGREGATED_BF16,
           "async k=1": [*_DISAGGREGATED_BF16, "rollout.max_staleness=1"],
           "async k=2": [*_DISAGGREGATED_BF16, "rollout.max_staleness=2"],
           "async k=4": [*_DISAGGREGATED_BF16, "rollout.max_staleness=4"],
           "fp8_rounded": [*_DISAGGREGATED_BF16, "weight_sync.rollout_precision=fp8_rounded"]}


def run(out: str, steps: int, overrides: list[str]) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "alp_megatron.cli", "--config", os.path.join(REPO, "examples", "cpu_tiny.yaml"), "--output-dir", out,
               "--steps", str(steps), "metrics.tensorboard=false", "run.export_hf_at_end=false",
               "checkpoint.save_every=0", "weight_sync.verify_every=0", *overrides]
    with open(out + ".log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_metrics(os.path.join(out, "metrics.jsonl"))[1:]


def median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def mean(records: list[dict], key: str) -> float:
    return statistics.fmean(r.get(key, 0.0) for r in records)


def breakdown(args) -> None:
    results = {name: run(f"{args.out}_{name}", args.steps, overrides) for name, overrides in VARIANTS.items()}
    print(f"{'run':<8} {'step s':>7} {'rollout %':>9} {'train %':>8} {'sync %':>7} {'other %':>8}")
    for name, records in results.items():
        step = median(records, "time_step")
        shares = {k: 100 * statistics.median(r[k] / r["time_step"] for r in records)
                  for k in ("time_rollout", "time_train", "time_sync")}
        other = 100 - sum(shares.values())
        print(f"{name:<8} {step:>7.2f} {shares['time_rollout']:>9.1f} {shares['time_train']:>8.1f} "
              f"{shares['time_sync']:>7.1f} {other:>8.1f}")
    alp, bypass, kl = results["alp"], results["bypass"], results["alp+kl"]
    print(f"ALP / bypass: step time {median(alp, 'time_step') / median(bypass, 'time_step'):.3f}, "
          f"train time {median(alp, 'time_train') / median(bypass, 'time_train'):.3f} "
          f"(medians of {len(alp)} steps; CPU, 2 trainer ranks at TP=2, 1 SGLang server)")
    print(f"ALP+KL / ALP: step time {median(kl, 'time_step') / median(alp, 'time_step'):.3f}, "
          f"train time {median(kl, 'time_train') / median(alp, 'time_train'):.3f} "
          f"(the reference model's forward-only pass)")


def regimes(args) -> None:
    results = {name: run(f"{args.out}_{name.replace(' ', '_').replace('=', '')}", args.steps, overrides)
               for name, overrides in REGIMES.items()}
    sync_rate = sum(r["samples"] for r in results["sync"]) / sum(r["time_step"] for r in results["sync"])
    print(f"{'run':<12} {'step s':>7} {'samples/s vs sync':>17} {'trainer idle %':>14} {'rollout idle %':>14} "
          f"{'k3':>9} {'abs diff':>9} {'token staleness':>15} {'partial %':>9}")
    for name, records in results.items():
        rate = sum(r["samples"] for r in records) / sum(r["time_step"] for r in records)
        print(f"{name:<12} {median(records, 'time_step'):>7.2f} {rate / sync_rate:>17.3f} "
              f"{100 * median(records, 'time_trainer_idle_share'):>14.1f} {100 * median(records, 'time_rollout_idle_share'):>14.1f} "
              f"{mean(records, 'mismatch_k3'):>9.2e} {mean(records, 'train_rollout_logprob_abs_diff'):>9.2e} "
              f"{mean(records, 'staleness_token_mean'):>15.2f} {100 * mean(records, 'partial_share'):>9.1f}")
    print(f"(medians and means of {args.steps - 1} steps; CPU, 2 trainer ranks at TP=2, 1 SGLang server in bfloat16)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench_loop"))
    parser.add_argument("--regimes", action="store_true", help="the off-policy regimes instead of the breakdown")
    args = parser.parse_args()
    (regimes if args.regimes else breakdown)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
