"""The paper's off-policy claims, reproduced on the embedded toy task: every method and ALP ablation, several
seeds, the real loop (SGLang on CPU, Megatron, the bridge), under a lower-precision rollout engine and stale
mini-batches. Writes the runs, a table, the claims checked, and plots into the output directory.

    python benchmarks/off_policy_study.py                       # the default study (benchmarks/off_policy_study.yaml)
    python benchmarks/off_policy_study.py --quick --output-dir /tmp/study    # 1 seed x 3 methods, a few minutes
    python benchmarks/off_policy_study.py --analyze-only        # tables and plots again from the kept runs
    python benchmarks/off_policy_study.py steps=40 off_policy.engine_temperature=1.1   # overrides

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
    parser.add_argument("--quick", action="store_true", help="the quick setting: one seed, three methods")
    parser.add_argument("--analyze-only", action="store_true", help="no runs: analyse the kept ones")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="study config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from alp_megatron.errors import AlpError
    from alp_megatron.study import analysis
    from alp_megatron.study.plan import load_study_config
    from alp_megatron.study.runner import run_study
    from alp_megatron.run.metrics import read_metrics

    try:
        study = load_study_config(args.config, tuple(args.overrides))
        if args.quick:
            study = study.quick_version()
    except AlpError as error:
        print(f"off_policy_study: {error}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.output_dir or (DEFAULT_OUTPUT + ("_quick" if args.quick else "")))
    os.makedirs(out, exist_ok=True)
    os.chdir(REPO)  # the study's run_config path is relative to the repository
    try:
        if args.analyze_only:
            from alp_megatron.study.runner import planned_runs

            runs = planned_runs(study, out)
        else:
            runs = run_study(study, out)
    except AlpError as error:
        print(f"off_policy_study: {error}", file=sys.stderr)
        return 1

    from alp_megatron.study.runner import is_complete

    by_configuration: dict[str, list[list[dict]]] = {}
    for spec, run_dir in runs:  # complete runs of this very study only (same overrides, every step)
        if is_complete(run_dir, study.steps, spec):
            records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))[: study.steps]
            by_configuration.setdefault(spec.configuration, []).append(records)
    results = analysis.results_by_configuration(by_configuration, study)
    table = analysis.markdown_table(results, study)
    found = analysis.claims(results)
    plots = analysis.plot_all(by_configuration, out)
    knobs = (f"off-policyness: engine {study.off_policy.engine_dtype} vs trainer float32, engine temperature "
             f"{study.off_policy.engine_temperature or 'as trainer (1.0)'}, {study.off_policy.num_mini_batches} "
             f"mini-batches per rollout batch; {study.steps} steps, seeds {list(study.seeds)}")
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(f"# Off-policy study\n\n{knobs}\n\n{table}\n\n## Claims at this scale\n\n"
                     f"{analysis.claims_markdown(found)}\n\nPlots: {', '.join(os.path.basename(p) for p in plots)}\n")
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump({"study": asdict(study), "results": [asdict(r) for r in results],
                   "claims": [{"claim": c, "holds": h, "evidence": e} for c, h, e in found]}, handle, indent=1)
    print(knobs)
    print(table)
    print(analysis.claims_markdown(found))
    print(f"results: {out}/results.md; plots: {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
