"""``benchmarks/off_policy_study.py --quick`` end to end: real runs (SGLang on CPU, Megatron, the bridge) of
three methods, then the table, the claims and the plots from them."""

import json
import os
import subprocess
import sys

import pytest

from alp_megatron.run.metrics import REQUIRED_KEYS, read_metrics

pytestmark = pytest.mark.sglang

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_study_runs_three_methods_and_writes_table_and_plots(tmp_path):
    out = tmp_path / "study"
    # three steps instead of the quick setting's five: what is checked needs only a few
    command = [sys.executable, os.path.join(REPO, "benchmarks", "off_policy_study.py"), "--quick",
               "--output-dir", str(out), "quick.steps=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    steps = summary["study"]["quick"]["steps"]
    assert steps == 3
    assert [r["configuration"] for r in summary["results"]] == ["bypass", "grpo", "alp_seq"]
    for configuration in ("bypass", "grpo", "alp_seq"):
        records = read_metrics(str(out / "runs" / configuration / "seed0" / "metrics.jsonl"))
        assert [r["step"] for r in records] == list(range(steps))
        for record in records:
            assert not [k for k in REQUIRED_KEYS if k not in record]
            assert record["train_infer_ratio_seq_p2"] <= record["train_infer_ratio_seq_p98"]
            assert record["mismatch_k3"] > 0  # the bf16 engine differs from the fp32 trainer
        run_dir = out / "runs" / configuration / "seed0"
        assert sorted(p.name for p in run_dir.iterdir()) == ["complete", "config.yaml", "metrics.jsonl", "train.log"]
        # ALP perturbs (its sigma moves); the baselines do not
        assert ("noise_ratio_mean" in records[-1]) == (configuration == "alp_seq")
    # every run started from the same warm-started policy: the same first rollout (seeded sampling)
    firsts = {c: read_metrics(str(out / "runs" / c / "seed0" / "metrics.jsonl"))[0]["reward_mean"]
              for c in ("bypass", "grpo", "alp_seq")}
    assert len(set(firsts.values())) == 1, firsts
    table = (out / "results.md").read_text()
    assert all(f"| {c} | 1 |" in table for c in ("bypass", "grpo", "alp_seq")) and "## Claims" in table
    assert summary["claims"]
    for plot in ("ratio_envelope.png", "reward.png", "sigma.png"):
        assert (out / plot).stat().st_size > 10_000
    # the kept runs alone give the same analysis again
    again = subprocess.run(command + ["--analyze-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["results"] == summary["results"]
