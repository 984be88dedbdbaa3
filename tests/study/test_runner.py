"""What the study runner counts as a finished run (an interrupted study reruns everything else)."""

import json

from alp_megatron.study.plan import RunSpec
from alp_megatron.study.runner import COMPLETE_MARKER, is_complete, run_fingerprint


def test_a_run_is_complete_only_with_its_marker_and_every_step(tmp_path):
    run = tmp_path / "alp_seq" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(3)))
    assert not is_complete(str(run), 3)  # metrics of a run that died after its last step (e.g. in the final save)
    (run / COMPLETE_MARKER).write_text("alp_seq/seed0\n")
    assert is_complete(str(run), 3)
    assert not is_complete(str(run), 4)  # a study asking for more steps runs it again


def test_a_kept_run_counts_only_for_the_same_overrides(tmp_path):
    run = tmp_path / "bypass" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    spec = RunSpec("bypass", 0, ("run.steps=1", "actor.num_mini_batches=4"))
    (run / COMPLETE_MARKER).write_text(run_fingerprint(spec))
    assert is_complete(str(run), 1, spec)
    assert not is_complete(str(run), 1, RunSpec("bypass", 0, ("run.steps=1", "actor.num_mini_batches=2")))
