"""Runs an off-policy study, regime by regime: one warm-started tiny model per model shape and seed, one SGLang
server per regime (in the regime's engine dtype, on the regime's model), each run its own ``alp-train``
process against that server.

Each run pushes its starting weights into the server before its first rollout (``rollout.server_urls``), so
runs never see each other's weights. Runs go one after another (they share the machine and the server). In a
regime the gate's probe (bypass, first seed) runs first, at each escalation level until one reaches the gate;
the regime's other runs follow at that level. The level is always worked out again from the kept probe runs
under the study's current gate (``gate.json`` in the regime's folder is only the record of the last walk), so an
analysis of kept runs chooses what a run of the study would. A run whose ``metrics.jsonl`` already holds every
step, with the same overrides, is kept, so an interrupted study continues where it stopped; a partial run is run
again from its start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from alp_megatron.atomic_files import write_text_atomically
from alp_megatron.config import RunConfig, load_run_config
from alp_megatron.errors import AlpError
from alp_megatron.run.metrics import read_metrics
from alp_megatron.study.analysis import finite_mean, finite_values
from alp_megatron.study.plan import RunSpec, StudyConfig, plan_runs, run_spec

logger = logging.getLogger(__name__)

# What a finished run keeps (the rest, checkpoints above all, is removed to keep a study small).
KEPT_FILES = ("metrics.jsonl", "config.yaml", "train.log")
COMPLETE_MARKER = "complete"  # written last, only after alp-train exited 0
GATE_FILE = "gate.json"
# Every run of a study generates on the study's server, given by URL (added by run_one).
RUNNER_OVERRIDES = ("rollout.mode=disaggregated",)


class StudyRunError(AlpError):
    """A run of the study failed; names the run and its log."""


def run_directory(output_dir: str, spec: RunSpec) -> str:
    return os.path.join(output_dir, "runs", spec.regime, f"level{spec.level}", spec.configuration, f"seed{spec.seed}")


def run_fingerprint(spec: RunSpec) -> str:
    """What makes a run's results: its configuration, seed and every alp-train override (study size, knobs,
    base-model settings). A kept run counts only for a study that would run it the same way."""
    return json.dumps({"run": spec.name, "overrides": list(spec.overrides)}, indent=1)


def is_complete(run_dir: str, steps: int, spec: Optional[RunSpec] = None) -> bool:
    """The run finished (alp-train exited 0) with ``steps`` steps of metrics (and, given ``spec``, with the
    same overrides as ``spec``)."""
    path, marker = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, COMPLETE_MARKER)
    if not (os.path.isfile(marker) and os.path.isfile(path) and len(read_metrics(path)) >= steps):
        return False
    if spec is None:
        return True
    with open(marker) as handle:
        return handle.read() == run_fingerprint(spec)


def regime_run_config(study: StudyConfig, regime: str) -> RunConfig:
    """The run config of ``regime``'s runs (its YAML with the study's and the regime's overrides)."""
    settings = study.regimes[regime]
    return load_run_config(settings.run_config or study.run_config,
                           (*study.overrides, *settings.knob_overrides(), *RUNNER_OVERRIDES))


def regime_layers(study: StudyConfig, regime: str) -> int:
    """Decoder layers of the model ``regime`` trains."""
    return num_layers(regime_run_config(study, regime))


def num_layers(config: RunConfig) -> int:
    """Decoder layers of the model the study trains (the tiny model's, or the HF checkpoint's)."""
    if config.model.hf_path:
        from alp_megatron.bridge.hf_folder import arch_from_hf_folder

        return arch_from_hf_folder(config.model.hf_path).num_layers
    return config.model.tiny_num_layers


def gate_measurement(records: list[dict]) -> dict:
    """What the gate reads from a probe run: its mean ``mismatch_k3`` over steps and the largest per-step p98 of
    its sequence mismatch ratio ``pi_old / mu`` (the engine's mismatch alone: not the drift of the step's
    updates, which the training ratio ``train_infer_ratio_seq_*`` also holds)."""
    return {"mismatch_k3_mean": finite_mean(finite_values(records, "mismatch_k3")),
            "seq_ratio_p98_max": max(finite_values(records, "mismatch_ratio_seq_p98"), default=math.nan)}


@dataclass
class RegimeState:
    """One regime's gate: what the probe measured at each level tried (``levels``), the level the regime runs
    at, and how many levels it has (``total_levels``: 1 + its escalation levels)."""

    total_levels: int
    levels: list = field(default_factory=list)  # [{"level", "overrides", "mismatch_k3_mean", "seq_ratio_p98_max", "reached"}]
    level: int = 0

    @property
    def reached(self) -> bool:
        return bool(self.levels) and self.levels[self.level]["reached"]

    @property
    def settled(self) -> bool:
        """The walk ended: a level reached the gate, or every level's probe finished below it."""
        return self.reached or len(self.levels) == self.total_levels

    def write(self, regime_dir: str) -> None:
        """``gate.json``: the record of the walk (the study reads its kept probe runs, not this file)."""
        os.makedirs(regime_dir, exist_ok=True)
        record = {"level": self.level, "reached": self.reached, "settled": self.settled, "levels": self.levels}
        write_text_atomically(os.path.join(regime_dir, GATE_FILE), json.dumps(record, indent=1))


def walk_gate(study: StudyConfig, regime: str, layers: int, probe: Callable[[RunSpec], Optional[str]],
              on_level: Callable[[RegimeState], None] = lambda state: None) -> RegimeState:
    """The regime's gate, level by level: ``probe(spec)`` gives the folder of the finished probe run of a level
    (running it, or None where it has not finished: the walk stops there), ``on_level`` sees the state after
    each level measured. Stops at the first level that reaches the gate."""
    settings, steps = study.regimes[regime], study.regime_steps(regime)
    state = RegimeState(total_levels=len(settings.escalation) + 1)
    for level in range(state.total_levels):
        run_dir = probe(run_spec(study, regime, study.gate.probe, study.seeds[0], layers, level))
        if run_dir is None:
            break
        measured = gate_measurement(read_metrics(os.path.join(run_dir, "metrics.jsonl"))[:steps])
        reached = study.gate.reached(measured["mismatch_k3_mean"], measured["seq_ratio_p98_max"])
        state.levels.append({"level": level, "overrides": settings.knob_overrides(level), **measured, "reached": reached})
        state.level = level
        on_level(state)
        if reached:
            break
    return state


def regime_directory(output_dir: str, regime: str) -> str:
    return os.path.join(output_dir, "runs", regime)


def regime_state(study: StudyConfig, regime: str, output_dir: str, layers: Optional[int] = None) -> RegimeState:
    """The gate of ``regime`` as its kept probe runs decide it under ``study``'s gate and levels (nothing is run)."""
    layers = regime_layers(study, regime) if layers is None else layers
    steps = study.regime_steps(regime)

    def kept(spec: RunSpec) -> Optional[str]:
        run_dir = run_directory(output_dir, spec)
        return run_dir if is_complete(run_dir, steps, spec) else None

    return walk_gate(study, regime, layers, kept)


def planned_runs(study: StudyConfig, output_dir: str) -> dict[str, list[tuple[RunSpec, str]]]:
    """``{regime: [(spec, run_dir)]}`` of every run of ``study`` at the level each regime's kept probe runs choose
    (the level where the walk stopped, for a regime whose gate is not settled)."""
    planned = {}
    for regime in study.regimes:
        layers = regime_layers(study, regime)
        level = regime_state(study, regime, output_dir, layers).level
        planned[regime] = [(spec, run_directory(output_dir, spec)) for spec in plan_runs(study, regime, layers, level)]
    return planned


def build_base_models(study: StudyConfig, config: RunConfig, output_dir: str) -> dict[int, str]:
    """``{seed: HF folder}``: the run config's tiny model, warm-started once per model shape and seed (shared by
    every configuration and regime of that shape and seed, so all start from the same policy)."""
    from alp_megatron.model.warm_start import ensure_warm_started_model

    if config.model.hf_path:
        return {seed: config.model.hf_path for seed in study.seeds}
    model, task = config.model, config.data.toy_task or "rev4"
    shape = f"{model.tiny_architecture}-L{model.tiny_num_layers}-warm{model.tiny_warm_start_steps}-{task}"
    return {seed: ensure_warm_started_model(os.path.join(output_dir, "base_models", f"{shape}-seed{seed}"), task,
                                            model.tiny_warm_start_steps, seed, model.tiny_num_layers,
                                            architecture=model.tiny_architecture)
            for seed in study.seeds}


def start_engine(study: StudyConfig, regime: str, config: RunConfig, model_path: str, log_dir: str):
    """One SGLang server for ``regime``: its engine dtype, the run config's extra server arguments, and MoE
    routes returned when the runs replay or compare them."""
    from alp_megatron.rollout.server import ServerConfig, start_servers

    megatron = config.model.megatron
    routes = megatron.routing_replay == "rollout" or megatron.routing_agreement
    dtype = study.regimes[regime].engine_dtype
    server_config = ServerConfig(model_path=model_path, port=0, dtype=dtype, log_dir=log_dir,
                                 extra_args=tuple(config.rollout.server_extra_args)
                                 + (("--enable-return-routed-experts",) if routes else ()),
                                 startup_timeout_s=config.rollout.startup_timeout_s)
    logger.info("starting regime %s's SGLang server (%s) on %s", regime, dtype, model_path)
    return start_servers([server_config])[0]


def run_one(study: StudyConfig, spec: RunSpec, run_dir: str, model_path: str, engine_url: str,
            timeout_s: float = 3600.0) -> None:
    """``alp-train`` for one run (world size 1, no torchrun), its output in ``run_dir/train.log``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    run_config = study.regimes[spec.regime].run_config or study.run_config
    command = [sys.executable, "-m", "alp_megatron.cli", "--config", run_config, "--output-dir", run_dir,
               *spec.overrides, f"model.hf_path={model_path}", *RUNNER_OVERRIDES,
               f"rollout.server_urls=[{engine_url}]"]
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if result.returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-30:])
        raise StudyRunError(f"run {spec.name} failed (exit {result.returncode}); log {log_path}:\n{tail}")
    for entry in os.listdir(run_dir):
        if entry not in KEPT_FILES:
            path = os.path.join(run_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with open(os.path.join(run_dir, COMPLETE_MARKER), "w") as marker:
        marker.write(run_fingerprint(spec))


class _Progress:
    """Counts finished runs across the study and estimates the time left from the runs run so far."""

    def __init__(self, total: int, report: Callable[[str], None]):
        self.total, self.done, self.ran, self.report = total, 0, 0, report
        self.started = time.monotonic()

    def kept(self) -> None:
        self.done += 1

    def finished(self, spec: RunSpec, run_dir: str, seconds: float) -> None:
        self.done, self.ran = self.done + 1, self.ran + 1
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        left = (time.monotonic() - self.started) / self.ran * max(self.total - self.done, 0)
        self.report(f"[{self.done}/{self.total}] {spec.name}: reward {_first_last(records, 'reward_mean')}, "
                    f"k3 {gate_measurement(records)['mismatch_k3_mean']:.2e}, {seconds:.0f} s "
                    f"(about {left / 60:.0f} min left)")


def run_study(study: StudyConfig, output_dir: str,
              progress: Callable[[str], None] = print) -> dict[str, list[tuple[RunSpec, str]]]:
    """Run every run of ``study`` not yet complete in ``output_dir`` (probing each regime's gate first);
    returns :func:`planned_runs`."""
    total = sum(len(plan_runs(study, name, regime_layers(study, name))) for name in study.regimes)
    counter = _Progress(total, progress)
    progress(f"off-policy study: {len(study.regimes)} regimes, {total} runs (more if a regime escalates) in "
             f"{output_dir}")
    for regime in study.regimes:
        _run_regime(study, regime, output_dir, counter)
    return planned_runs(study, output_dir)


def _run_regime(study: StudyConfig, regime: str, output_dir: str, counter: _Progress) -> None:
    settings = study.regimes[regime]
    config = regime_run_config(study, regime)
    layers, steps = num_layers(config), study.regime_steps(regime)
    folder = regime_directory(output_dir, regime)
    server, models = None, None

    def ensure(spec: RunSpec) -> str:
        nonlocal server, models
        run_dir = run_directory(output_dir, spec)
        if is_complete(run_dir, steps, spec):
            counter.kept()
            return run_dir
        if server is None:
            models = build_base_models(study, config, output_dir)
            server = start_engine(study, regime, config, models[study.seeds[0]], os.path.join(output_dir, "logs", regime))
        started = time.monotonic()
        run_one(study, spec, run_dir, models[spec.seed], server.url)
        counter.finished(spec, run_dir, time.monotonic() - started)
        return run_dir

    def measured(state: RegimeState) -> None:
        state.write(folder)
        entry = state.levels[-1]
        if not entry["reached"] and len(state.levels) < state.total_levels:
            counter.total += 1  # the next level's probe; this level's other runs are not run
            counter.report(f"regime {regime}: level {state.level} did not reach the gate (k3 "
                           f"{entry['mismatch_k3_mean']:.2e}, pi_old / mu seq p98 {entry['seq_ratio_p98_max']:.3f}); "
                           f"escalating to {settings.escalation[state.level]}")

    try:
        state = walk_gate(study, regime, layers, ensure, measured)
        for spec in plan_runs(study, regime, layers, state.level)[1:]:  # the first is the probe, run above
            ensure(spec)
    finally:
        if server is not None:
            server.stop()


def _first_last(records: list[dict], key: str) -> Optional[str]:
    if not records:
        return "-"
    return f"{records[0].get(key, float('nan')):.3f} -> {records[-1].get(key, float('nan')):.3f}"
