"""The paper's off-policy claims, tested in the regimes where off-policyness is real: every method and ALP
ablation, several seeds, the real loop (SGLang on CPU, Megatron, the bridge), regime by regime (a bf16 engine,
FP8-rounded engine weights, bounded-staleness asynchronous rollouts, MoE routes replayed or not, multi-turn
tools). Each regime is gated on the mismatch it really produced (and pushed harder where it fell short). Writes
the runs, a table per regime, the claims checked with a verdict per claim, and plots into the output directory.

    python benchmarks/off_policy_study.py                       # the default study (benchmarks/off_policy_study.yaml)
    python benchmarks/off_policy_study.py --quick --output-dir /tmp/study    # 2 regimes x 2 methods, minutes
    python benchmarks/off_policy_study.py --analyze-only        # tables and plots again from the kept runs
    python benchmarks/off_policy_study.py steps=40 regimes.bf16.engine_temperature=1.1   # overrides

An interrupted study continues where it stopped (complete runs are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "benchmarks", "off_policy_study.yaml")
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "off_policy")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="study YAML (default: %(default)s)")
    parser.add_argument("--output-dir", help=f"runs, table and plots (default: {DEFAULT_OUTPUT}, or "
                                             f"{DEFAULT_OUTPUT}_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="the quick setting: two regimes, two methods, one seed")
    parser.add_argument("--analyze-only", action="store_true", help="no runs: analyse the kept ones")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="study config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from alp_megatron.errors import AlpError
    from alp_megatron.study.plan import load_study_config
    from alp_megatron.study.runner import run_study

    try:
        study = load_study_config(args.config, tuple(args.overrides))
        if args.quick:
            study = study.quick_version()
    except AlpError as error:
        print(f"off_policy_study: {error}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.output_dir or (DEFAULT_OUTPUT + ("_quick" if args.quick else "")))
    os.makedirs(out, exist_ok=True)
    os.chdir(REPO)  # the study's run_config paths are relative to the repository
    try:
        from alp_megatron.study.runner import planned_runs

        runs = planned_runs(study, out) if args.analyze_only else run_study(study, out)
    except AlpError as error:
        print(f"off_policy_study: {error}", file=sys.stderr)
        return 1
    report = write_report(study, runs, out)
    print(report)
    print(f"results: {out}/results.md, {out}/results.json; plots in {out}/plots")
    return 0


def write_report(study, runs: dict, out: str) -> str:
    """``results.md`` and ``results.json`` from the complete runs of ``runs`` (``{regime: [(spec, run_dir)]}``),
    plots under ``plots/<regime>/``; returns the Markdown."""
    from alp_megatron.run.metrics import read_metrics
    from alp_megatron.study import analysis
    from alp_megatron.study.runner import is_complete, regime_state

    gate = study.gate
    summary = [f"| regime | what | level (overrides added) | {gate.probe} k3 (mean) | "
               f"{gate.probe} pi_old / mu seq P98 (max) | tests the claims |", "|---|---|---|---|---|---|"]
    sections, regimes_json = [], []
    for regime, regime_runs in runs.items():
        settings = study.regimes[regime]
        state = regime_state(study, regime, out)
        by_configuration: dict[str, list[list[dict]]] = {}
        for spec, run_dir in regime_runs:  # complete runs of this very study only (same overrides, every step)
            if is_complete(run_dir, study.regime_steps(regime), spec):
                records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[: study.regime_steps(regime)]
                by_configuration.setdefault(spec.configuration, []).append(records)
        results = analysis.results_by_configuration(by_configuration, study)
        found = analysis.claims(results)
        verdicts = analysis.verdicts(found, state.reached)
        plots = []
        if by_configuration:
            os.makedirs(os.path.join(out, "plots", regime), exist_ok=True)
            plots = analysis.plot_all(by_configuration, os.path.join(out, "plots", regime), regime)
        probe = state.levels[state.level] if state.levels else None
        added = ", ".join(settings.escalation[state.level - 1]) if state.level else "none"
        tested = ("not run" if probe is None else "yes" if state.reached else "no: below the gate at every level"
                  if state.settled else f"not settled: the probe of level {state.level + 1} has not finished")
        summary.append(f"| {regime} | {settings.description or '-'} | {state.level} ({added}) | "
                       + (f"{probe['mismatch_k3_mean']:.2e} | {probe['seq_ratio_p98_max']:.3f} | " if probe else "- | - | ")
                       + f"{tested} |")
        knobs = (f"{study.regime_steps(regime)} steps per run, engine {settings.engine_dtype}; run config "
                 f"{settings.run_config or study.run_config}; the regime's overrides at level {state.level}: "
                 f"{', '.join(settings.knob_overrides(state.level))}")
        if not results:
            sections.append(f"## Regime {regime}\n\n{settings.description}\n\n{knobs}\n\nNo finished run yet.\n")
        else:
            sections.append(f"## Regime {regime}\n\n{settings.description}\n\n{knobs}\n\n"
                            f"{analysis.markdown_table(results, study)}\n\n### Verdicts\n\n"
                            + "\n".join(f"- {line}" for line in verdicts)
                            + f"\n\n### Claims\n\n{analysis.claims_markdown(found)}\n\n"
                            f"Plots: {', '.join(os.path.relpath(p, out) for p in plots)}\n")
        regimes_json.append({"regime": regime, "settings": asdict(settings), "level": state.level,
                             "gate_reached": state.reached, "gate_settled": state.settled, "levels": state.levels,
                             "results": [asdict(r) for r in results], "claims": [asdict(c) for c in found],
                             "verdicts": verdicts})
    head = (f"# Off-policy study\n\n{study.steps} steps per run (unless a regime says), seeds {list(study.seeds)}. "
            f"A regime tests the claims when {gate.probe}'s mean mismatch k3 reaches {gate.mismatch_k3:g} or the P98 of its sequence "
            f"mismatch ratio pi_old / mu reaches {gate.seq_ratio_p98:g}.\n\n" + "\n".join(summary) + "\n")
    report = "\n".join([head] + sections)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(report)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump({"study": asdict(study), "regimes": regimes_json}, handle, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(main())
