"""Runs an off-policy study: one warm-started tiny model per seed, one SGLang server for every run, and each
run as its own ``alp-train`` process against that server.

The server serves in ``off_policy.engine_dtype`` (the controlled mismatch); each run pushes its starting
weights into it before its first rollout (``rollout.server_urls``), so runs never see each other's weights.
Runs go one after another (they share the machine and the server). A run whose ``metrics.jsonl`` already
holds every step is kept, so an interrupted study continues where it stopped; a partial run is run again
from its start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

from alp_megatron.config import RunConfig, load_run_config
from alp_megatron.errors import AlpError
from alp_megatron.study.plan import RunSpec, StudyConfig, plan_runs
from alp_megatron.run.metrics import read_metrics

logger = logging.getLogger(__name__)

# What a finished run keeps (the rest, checkpoints above all, is removed to keep a study small).
KEPT_FILES = ("metrics.jsonl", "config.yaml", "train.log")
COMPLETE_MARKER = "complete"  # written last, only after alp-train exited 0


class StudyRunError(AlpError):
    """A run of the study failed; names the run and its log."""


def run_directory(output_dir: str, spec: RunSpec) -> str:
    return os.path.join(output_dir, "runs", spec.configuration, f"seed{spec.seed}")


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


def num_layers(config: RunConfig) -> int:
    """Decoder layers of the model the study trains (the tiny model's, or the HF checkpoint's)."""
    if config.model.hf_path:
        from alp_megatron.bridge.hf_folder import arch_from_hf_folder

        return arch_from_hf_folder(config.model.hf_path).num_layers
    return config.model.tiny_num_layers


def planned_runs(study: StudyConfig, output_dir: str,
                 config: Optional[RunConfig] = None) -> list[tuple[RunSpec, str]]:
    """``[(spec, run_dir)]`` of every run of ``study`` (``config``: its run config, loaded if not given)."""
    config = config or load_run_config(study.run_config, study.overrides)
    return [(spec, run_directory(output_dir, spec)) for spec in plan_runs(study, num_layers(config))]


def build_base_models(study: StudyConfig, config: RunConfig, output_dir: str) -> dict[int, str]:
    """``{seed: HF folder}``: the run config's tiny model, warm-started once per seed (shared by every
    configuration of that seed, so all start from the same policy)."""
    from alp_megatron.model.warm_start import ensure_warm_started_model

    if config.model.hf_path:
        return {seed: config.model.hf_path for seed in study.seeds}
    model = config.model
    shape = f"L{model.tiny_num_layers}-warm{model.tiny_warm_start_steps}-{config.data.toy_task}"
    return {seed: ensure_warm_started_model(os.path.join(output_dir, "base_models", f"{shape}-seed{seed}"),
                                            config.data.toy_task or "rev4", model.tiny_warm_start_steps, seed,
                                            model.tiny_num_layers)
            for seed in study.seeds}


def start_engine(study: StudyConfig, config: RunConfig, model_path: str, log_dir: str):
    """One SGLang server in ``off_policy.engine_dtype`` with the run config's extra server arguments."""
    from alp_megatron.rollout.server import ServerConfig, start_servers

    server_config = ServerConfig(model_path=model_path, port=0, dtype=study.off_policy.engine_dtype,
                                 extra_args=config.rollout.server_extra_args, log_dir=log_dir,
                                 startup_timeout_s=config.rollout.startup_timeout_s)
    logger.info("starting the study's SGLang server (%s) on %s", study.off_policy.engine_dtype, model_path)
    return start_servers([server_config])[0]


def run_one(study: StudyConfig, spec: RunSpec, run_dir: str, model_path: str, engine_url: str,
            timeout_s: float = 3600.0) -> None:
    """``alp-train`` for one run (world size 1, no torchrun), its output in ``run_dir/train.log``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    command = [sys.executable, "-m", "alp_megatron.cli", "--config", study.run_config, "--output-dir", run_dir,
               *spec.overrides, f"model.hf_path={model_path}", "rollout.mode=disaggregated",
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


def run_study(study: StudyConfig, output_dir: str,
              progress: Callable[[str], None] = print) -> list[tuple[RunSpec, str]]:
    """Run every run of ``study`` not yet complete in ``output_dir``; returns ``[(spec, run_dir)]`` of all."""
    config = load_run_config(study.run_config, study.overrides)
    runs = planned_runs(study, output_dir, config)
    todo = [spec for spec, run_dir in runs if not is_complete(run_dir, study.steps, spec)]
    progress(f"off-policy study: {len(runs)} runs ({len(runs) - len(todo)} already complete) in {output_dir}")
    if todo:
        models = build_base_models(study, config, output_dir)
        server = start_engine(study, config, models[study.seeds[0]], os.path.join(output_dir, "logs"))
        started = time.monotonic()
        try:
            for index, spec in enumerate(todo, 1):
                run_started = time.monotonic()
                run_dir = run_directory(output_dir, spec)
                run_one(study, spec, run_dir, models[spec.seed], server.url)
                records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                elapsed = time.monotonic() - started
                remaining = elapsed / index * (len(todo) - index)
                progress(f"[{index}/{len(todo)}] {spec.name}: reward {_first_last(records, 'reward_mean')}, "
                         f"{time.monotonic() - run_started:.0f} s (about {remaining / 60:.0f} min left)")
        finally:
            server.stop()
    return runs


def _first_last(records: list[dict], key: str) -> Optional[str]:
    if not records:
        return "-"
    return f"{records[0].get(key, float('nan')):.3f} -> {records[-1].get(key, float('nan')):.3f}"
