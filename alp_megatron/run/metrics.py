"""Per-step metrics: ``metrics.jsonl`` in the output directory, TensorBoard, W&B when configured, and GPU
telemetry (utilisation, memory, power) through nvidia-ml-py when there is a GPU.

Only global rank 0 writes. ``metrics.jsonl`` gets one JSON object per step, flushed and fsynced, so a
crash loses at most the step in flight; on resume, lines of steps past the checkpoint are dropped first
(they were computed by a run the checkpoint does not contain).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass
from typing import Optional, Protocol

from alp_megatron.atomic_files import write_text_atomically
from alp_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

REQUIRED_KEYS = (
    "step", "reward_mean", "response_len_mean", "ratio_seq_p999", "ratio_seq_max", "clip_frac", "mismatch_k3",
    "sigma_mean", "sigma_min", "sigma_max", "grad_norm", "entropy", "weight_version", "time_step",
    "time_rollout", "time_train", "time_sync",
)


@dataclass(frozen=True)
class MetricsConfig:
    """``tensorboard``: write event files under ``<output_dir>/tensorboard``. ``wandb_project``: log to W&B
    (``pip install 'alp-megatron[wandb]'``; a resumed run continues the same W&B run; ``WANDB_MODE=offline``
    works without a network). ``gpu_telemetry``: per-GPU utilisation/memory/power when a GPU exists.
    ``save_rollouts``: write every step's trained samples to ``<output_dir>/rollouts/step_<step>.jsonl``
    (:func:`write_rollouts`), to inspect or recompute what the trainer saw; a debugging aid, not for long runs
    at scale (a 32k-token response is about 0.8 MB of JSON)."""

    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    gpu_telemetry: bool = True
    save_rollouts: bool = False

    def __post_init__(self):
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ConfigError("metrics.wandb_project", "is empty", "give a project name, or leave it unset")


class MetricsSink(Protocol):
    def write(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class JsonlSink:
    """Appends ``{"step": ..., **metrics}`` lines to ``path``."""

    def __init__(self, path: str, resume_after_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_after_step is not None and os.path.exists(path):
            _truncate_after(path, resume_after_step)
        self._handle = open(path, "a")

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items() if k != "step"}}
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _truncate_after(path: str, last_step: int) -> None:
    with open(path) as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", -1) <= last_step]
    write_text_atomically(path, "".join(kept))


def read_metrics(path: str) -> list[dict]:
    """Every record of a ``metrics.jsonl``, in order."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_rollouts(output_dir: str, step: int, samples: list) -> str:
    """Write the samples of step ``step`` that the trainer trains on, one JSON object per line (``sample_id``,
    ``group_id``, ``prompt_ids``, ``response_ids``, ``rollout_logprobs`` (the engine's, one per response token),
    ``loss_mask``, ``reward``, ``advantage``, ``finish_reason``, ``weight_versions``: the version that produced
    each run of response tokens, ``{"version", "start", "end"}``), to
    ``<output_dir>/rollouts/`` atomically. Returns the file's path."""
    path = os.path.join(output_dir, "rollouts", f"step_{step:08d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    for sample in samples:
        lines.append(json.dumps({
            "sample_id": sample.sample_id, "group_id": sample.group_id, "prompt_ids": list(sample.prompt_ids),
            "response_ids": list(sample.response_ids), "rollout_logprobs": list(sample.rollout_logprobs),
            "loss_mask": list(sample.loss_mask), "reward": sample.reward, "advantage": sample.advantage,
            "finish_reason": sample.finish_reason,
            "weight_versions": [{"version": span.version, "start": span.start, "end": span.end}
                                for span in sample.weight_versions]
                               or [{"version": sample.weight_version, "start": 0, "end": len(sample.response_ids)}],
        }) + "\n")
    write_text_atomically(path, "".join(lines))
    return path


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per output directory: its id is kept in ``<output_dir>/wandb_run_id``, and a resumed run
    (``resume_after_step`` set) continues it instead of starting another. Metrics are plotted against the
    training ``step`` (W&B's own step only counts calls): W&B drops a record whose step is not above the
    last one it holds, and after a resume the steps between the checkpoint and the crash are logged again."""

    ID_FILE = "wandb_run_id"

    def __init__(self, project: str, run_name: Optional[str], config: dict, output_dir: str,
                 resume_after_step: Optional[int] = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("metrics.wandb_project", "is set but wandb is not installed",
                              "pip install 'alp-megatron[wandb]', or unset metrics.wandb_project") from None
        id_path = os.path.join(output_dir, self.ID_FILE)
        run_id = None
        if resume_after_step is not None and os.path.exists(id_path):
            with open(id_path) as handle:
                run_id = handle.read().strip() or None
        resumed = run_id is not None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B run ids: lower-case letters and digits
            write_text_atomically(id_path, run_id + "\n")
        self._run = wandb.init(project=project, name=run_name, config=config, dir=output_dir, id=run_id,
                               resume="allow")
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        logger.info("W&B run %s (%s)", run_id, "continued" if resumed else "new")

    @property
    def run_id(self) -> str:
        return self._run.id

    @property
    def latest(self) -> dict:
        """The newest value of each metric the run holds (W&B's summary)."""
        return dict(self._run.summary)

    def write(self, step: int, metrics: dict) -> None:
        record = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._run.log({**record, "step": step})

    def close(self) -> None:
        self._run.finish()


class GpuTelemetry:
    """Utilisation (%), memory used (GiB) and power (W) of each visible GPU; ``{}`` where NVML is absent."""

    def __init__(self):
        self._handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as error:  # pynvml.NVMLError (no driver) or a missing package: no telemetry
            logger.debug("GPU telemetry off: %s", error)

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def read(self) -> dict:
        readings = {}
        for index, handle in enumerate(self._handles):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                readings[f"gpu{index}_util"] = float(util.gpu)
                readings[f"gpu{index}_mem_gib"] = memory.used / 2**30
                readings[f"gpu{index}_power_w"] = self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except self._nvml.NVMLError as error:
                logger.debug("GPU %d telemetry failed: %s", index, error)
        return readings


class MetricsLogger:
    """Fans one step's metrics out to every configured sink (call on global rank 0 only)."""

    def __init__(self, output_dir: str, config: MetricsConfig, run_config: Optional[dict] = None,
                 resume_after_step: Optional[int] = None):
        self.sinks: list = [JsonlSink(os.path.join(output_dir, "metrics.jsonl"), resume_after_step)]
        if config.tensorboard:
            self.sinks.append(TensorBoardSink(os.path.join(output_dir, "tensorboard")))
        if config.wandb_project:
            self.sinks.append(WandbSink(config.wandb_project, config.wandb_run_name, run_config or {}, output_dir,
                                        resume_after_step))
        self.telemetry = GpuTelemetry() if config.gpu_telemetry else None

    def write(self, step: int, metrics: dict) -> dict:
        record = dict(metrics)
        if self.telemetry is not None and self.telemetry.available:
            record.update(self.telemetry.read())
        missing = [key for key in REQUIRED_KEYS if key not in record and key != "step"]
        if missing:
            logger.warning("step %d: metrics missing %s", step, missing)
        for sink in self.sinks:
            sink.write(step, record)
        return record

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
