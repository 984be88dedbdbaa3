"""What the study runner counts as a finished run (an interrupted study reruns everything else), and how a
regime's gate picks its level from the probe runs."""

import json
import os

from dataclasses import replace

from alp_megatron.study.plan import GateSettings, RegimeConfig, RunSpec, StudyConfig, plan_runs
from alp_megatron.study.runner import (
    COMPLETE_MARKER, GATE_FILE, is_complete, planned_runs, regime_directory, regime_state, run_directory,
    run_fingerprint, run_study,
)


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
    spec = RunSpec("bf16", "bypass", 0, ("run.steps=1", "actor.num_mini_batches=4"))
    (run / COMPLETE_MARKER).write_text(run_fingerprint(spec))
    assert is_complete(str(run), 1, spec)
    assert not is_complete(str(run), 1, RunSpec("bf16", "bypass", 0, ("run.steps=1", "actor.num_mini_batches=2")))


def _keep(out, spec, k3, steps=2):
    """A finished run of ``spec`` whose every step measured ``k3``."""
    run_dir = run_directory(str(out), spec)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as handle:
        for step in range(steps):
            handle.write(json.dumps({"step": step, "reward_mean": 0.5, "mismatch_k3": k3,
                                     "mismatch_ratio_seq_p98": 1.01}) + "\n")
    with open(os.path.join(run_dir, COMPLETE_MARKER), "w") as marker:
        marker.write(run_fingerprint(spec))


def _study(levels):
    regime = RegimeConfig(methods=("bypass", "alp_seq"), ablations=(),
                          escalation=tuple((f"rollout.engine_temperature={t}",) for t in levels))
    return StudyConfig(steps=2, seeds=(0,), regimes={"bf16": regime}, overrides=("model.tiny_num_layers=3",))


def test_the_gate_runs_the_regime_at_the_first_level_whose_probe_reached_it(tmp_path):
    """Probes kept at levels 0 (k3 below the gate) and 1 (above): the regime runs at level 1, its gate.json says
    what each level measured, and level 2 is never tried (nothing runs: every run needed is kept)."""
    study = _study([1.1, 1.3])
    _keep(tmp_path, plan_runs(study, "bf16", 3, level=0)[0], k3=1e-5)
    for spec in plan_runs(study, "bf16", 3, level=1):
        _keep(tmp_path, spec, k3=5e-3)
    runs = run_study(study, str(tmp_path), progress=lambda line: None)
    state = regime_state(study, "bf16", str(tmp_path))
    assert state.level == 1 and state.reached and [entry["reached"] for entry in state.levels] == [False, True]
    with open(os.path.join(regime_directory(str(tmp_path), "bf16"), GATE_FILE)) as handle:
        assert json.load(handle)["levels"] == state.levels  # the record of the walk
    assert state.levels[1]["mismatch_k3_mean"] == 5e-3
    assert "rollout.engine_temperature=1.1" in state.levels[1]["overrides"]
    assert [spec.level for spec, _ in runs["bf16"]] == [1, 1] and runs == planned_runs(study, str(tmp_path))


def test_a_regime_that_never_reaches_the_gate_runs_at_its_last_level_and_says_so(tmp_path):
    study = _study([1.1])
    for level in (0, 1):
        for spec in plan_runs(study, "bf16", 3, level=level)[: 1 if level == 0 else None]:
            _keep(tmp_path, spec, k3=1e-5)
    run_study(study, str(tmp_path), progress=lambda line: None)
    state = regime_state(study, "bf16", str(tmp_path))
    assert state.level == 1 and not state.reached and state.settled and len(state.levels) == 2


def test_the_gate_is_read_from_the_kept_probes_under_the_current_gate(tmp_path):
    """A study stopped before level 1's probe finished: its gate is not settled and its runs are level 0's; the
    same kept probe under a lower gate reaches it at level 0 (nothing is read from an older gate.json)."""
    study = _study([1.1])
    _keep(tmp_path, plan_runs(study, "bf16", 3, level=0)[0], k3=1e-5)
    state = regime_state(study, "bf16", str(tmp_path))
    assert state.level == 0 and not state.reached and not state.settled
    assert {spec.level for spec, _ in planned_runs(study, str(tmp_path))["bf16"]} == {0}
    lower = replace(study, gate=GateSettings(mismatch_k3=1e-6))
    assert regime_state(lower, "bf16", str(tmp_path)).reached
