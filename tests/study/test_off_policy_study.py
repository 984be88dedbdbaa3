"""``benchmarks/off_policy_study.py --quick`` end to end: real runs (SGLang on CPU, Megatron, the bridge) of two
methods in two regimes (a bf16 engine; FP8-rounded engine weights), then per regime the gate, the table, the
claims with their verdicts, and the plots."""

import json
import os
import subprocess
import sys

import pytest

from alp_megatron.run.metrics import REQUIRED_KEYS, read_metrics

pytestmark = pytest.mark.sglang

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGIMES, METHODS = ("bf16", "fp8_rounded"), ("bypass", "alp_seq")


def test_quick_study_runs_two_regimes_and_writes_tables_verdicts_and_plots(tmp_path):
    out = tmp_path / "study"
    # three steps instead of the quick setting's five: what is checked needs only a few
    command = [sys.executable, os.path.join(REPO, "benchmarks", "off_policy_study.py"), "--quick",
               "--output-dir", str(out), "quick.steps=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["study"]["quick"]["steps"] == 3
    assert [regime["regime"] for regime in summary["regimes"]] == list(REGIMES)
    k3 = {}
    for regime in summary["regimes"]:
        name = regime["regime"]
        assert [r["configuration"] for r in regime["results"]] == list(METHODS)
        assert regime["level"] == 0 and regime["levels"][0]["reached"] == regime["gate_reached"]
        assert len(regime["verdicts"]) >= 3 and regime["claims"]
        firsts = []
        for configuration in METHODS:
            run_dir = out / "runs" / name / "level0" / configuration / "seed0"
            records = read_metrics(str(run_dir / "metrics.jsonl"))
            assert [r["step"] for r in records] == [0, 1, 2]
            for record in records:
                assert not [k for k in REQUIRED_KEYS if k not in record]
                assert record["train_infer_ratio_seq_p2"] <= record["train_infer_ratio_seq_p98"]
                assert record["mismatch_k3"] > 0  # the bf16 engine differs from the fp32 trainer
            assert sorted(p.name for p in run_dir.iterdir()) == ["complete", "config.yaml", "metrics.jsonl", "train.log"]
            assert ("noise_ratio_mean" in records[-1]) == (configuration == "alp_seq")  # only ALP perturbs
            firsts.append(records[0]["reward_mean"])
        assert len(set(firsts)) == 1, firsts  # every run of a regime starts from the same policy and prompts
        k3[name] = regime["levels"][0]["mismatch_k3_mean"]
        for plot in ("ratio_envelope.png", "reward.png", "sigma.png"):
            assert (out / "plots" / name / plot).stat().st_size > 10_000
    assert k3["fp8_rounded"] > k3["bf16"]  # rounding the engine's weights through e4m3 adds mismatch
    report = (out / "results.md").read_text()
    assert all(f"## Regime {name}" in report and f"| {name} |" in report for name in REGIMES)
    assert "### Verdicts" in report and "| bypass | 1 |" in report
    # the kept runs alone give the same analysis again
    again = subprocess.run(command + ["--analyze-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["regimes"] == summary["regimes"]
