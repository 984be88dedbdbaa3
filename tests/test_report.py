"""A run's summary: the table and the PNG, from a metrics.jsonl with the mismatch and staleness trends."""

import json
import math

from alp_megatron.report import summarize


def test_the_summary_plots_every_panel_from_the_metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in range(6):
            handle.write(json.dumps({
                "step": step, "reward_mean": 0.1 * step, "ratio_seq_p999": 1.5, "ratio_seq_max": 2.0 + step,
                "mismatch_k3": 1e-4 * (step + 1), "train_rollout_logprob_abs_diff": 0.01, "sigma_mean": 0.01,
                "sigma_layer0": 0.01, "sigma_layer1": 0.02, "grad_norm": 1.0, "time_step": 3.0,
                "staleness_token_mean": step % 3, "partial_share": 0.25}) + "\n")
    text, path = summarize(str(tmp_path), every=2)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["step", "reward_mean", "ratio_seq_p999", "ratio_seq_max", "mismatch_k3"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "3", "5", "6"]  # every 2nd step and the last
    assert math.isclose(float(lines[-1].split()[4]), 6e-4)
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (2000, 400)  # four panels
