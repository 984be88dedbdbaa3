"""metrics.jsonl, TensorBoard, W&B (offline) and GPU telemetry sinks."""

import math
import os

import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.run.metrics import GpuTelemetry, MetricsConfig, MetricsLogger, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(str(tmp_path), MetricsConfig(tensorboard=True))
    for step in range(3):
        logger.write(step, {"reward_mean": 0.1 * step, "grad_norm": float("nan") if step == 1 else 1.0})
    logger.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[2]["reward_mean"] == pytest.approx(0.2)
    assert records[1]["grad_norm"] == "nan"  # JSON has no NaN; it stays visible as a string
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.")]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_resume_drops_steps_past_the_checkpoint(tmp_path):
    logger = MetricsLogger(str(tmp_path), MetricsConfig(tensorboard=False))
    for step in range(5):
        logger.write(step, {"reward_mean": float(step)})
    logger.close()
    resumed = MetricsLogger(str(tmp_path), MetricsConfig(tensorboard=False), resume_after_step=2)
    resumed.write(3, {"reward_mean": 30.0})
    resumed.close()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["reward_mean"]) for r in records] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_gpu_telemetry_is_empty_without_a_gpu():
    import torch

    telemetry = GpuTelemetry()
    if torch.cuda.is_available():
        assert telemetry.available and all(math.isfinite(v) for v in telemetry.read().values())
    else:
        assert not telemetry.available and telemetry.read() == {}


def test_config_errors():
    with pytest.raises(ConfigError, match="metrics.wandb_project"):
        MetricsConfig(wandb_project=" ")


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extras; install alp-megatron[test]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_resume_continues_the_same_run_and_a_fresh_start_makes_another(tmp_path, wandb_offline):
    config = MetricsConfig(tensorboard=False, wandb_project="alp-test", gpu_telemetry=False)
    first = MetricsLogger(str(tmp_path), config, {"seed": 1})
    run_id = first.sinks[-1].run_id
    for step in range(3):
        first.write(step, {"reward_mean": float(step), "skipped": True})
    latest = first.sinks[-1].latest
    assert latest["step"] == 2 and latest["reward_mean"] == 2.0 and "skipped" not in latest  # booleans are not metrics
    first.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id

    resumed = MetricsLogger(str(tmp_path), config, {"seed": 1}, resume_after_step=1)
    assert resumed.sinks[-1].run_id == run_id
    resumed.write(2, {"reward_mean": 20.0})  # a step the first run logged too, logged again after the resume
    assert resumed.sinks[-1].latest["reward_mean"] == 20.0
    resumed.close()

    fresh = MetricsLogger(str(tmp_path), config, {"seed": 2})
    assert fresh.sinks[-1].run_id != run_id
    fresh.close()
