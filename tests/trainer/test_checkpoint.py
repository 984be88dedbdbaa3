"""Checkpoints on real gloo ranks: an exact resume, a resharded resume, and crash safety of `latest`."""

import os

import pytest

from alp_megatron.model.provider import ModelConfig, ParallelConfig
from alp_megatron.trainer.checkpoint import CheckpointConfig, find_latest_checkpoint
from alp_megatron.errors import ConfigError
from tests.distributed import run_ranks
from tests.model.layouts import Layout, save_reference
from tests.trainer.checkpoint_probes import DROPOUT, resume, save_then_load_a_layer_range, train_then_save

pytestmark = pytest.mark.megatron
TP2 = ParallelConfig(tensor_parallel=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("reference"))
    run_ranks(1, save_reference, Layout("checkpoint"), directory)
    return directory


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("checkpoints"))
    uninterrupted = run_ranks(2, train_then_save, TP2, reference, directory, ModelConfig())[0]
    return reference, directory, uninterrupted


def test_resume_continues_exactly(reference, tmp_path):
    """Through the code a resumed run uses (RunProgress, load_checkpoint), with dropout on: the same prompts,
    noise keys and dropout masks as the uninterrupted run, bit for bit."""
    directory = str(tmp_path / "checkpoints")
    uninterrupted = run_ranks(2, train_then_save, TP2, reference, directory, DROPOUT)[0]
    resumed = run_ranks(2, resume, TP2, reference, directory, DROPOUT)[0]
    assert os.path.basename(resumed["path"]) == "step_00000001"
    assert resumed["progress"] == uninterrupted["progress"]
    assert resumed["progress"]["optimizer_steps"] == 2 and resumed["progress"]["data_position"]["index"] == 2
    assert resumed["losses"] == uninterrupted["losses"]  # bit-identical: weights, Adam, LR, data, noise, dropout
    assert resumed["lr"] == uninterrupted["lr"]
    assert resumed["log_sigma"] == uninterrupted["log_sigma"]


def test_resume_into_another_layout(saved):
    reference, directory, uninterrupted = saved
    resumed = run_ranks(1, resume, ParallelConfig(), reference, directory, ModelConfig())[0]
    for got, want in zip(resumed["losses"], uninterrupted["losses"]):
        assert got == pytest.approx(want, rel=1e-5)
    assert resumed["log_sigma"] == pytest.approx(uninterrupted["log_sigma"], rel=1e-5)


def test_crashed_save_never_hides_the_latest(saved, tmp_path):
    _, directory, _ = saved
    complete = find_latest_checkpoint(directory)
    # a save that died half way: its folder is still ".partial", `latest` was never switched
    os.makedirs(os.path.join(directory, "step_00000009.partial"), exist_ok=True)
    assert find_latest_checkpoint(directory) == complete
    # a `latest` naming a folder that is gone falls back to the newest complete checkpoint
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    os.symlink(complete, os.path.join(broken, os.path.basename(complete)))
    with open(os.path.join(broken, "latest"), "w") as handle:
        handle.write("step_00000042")
    assert find_latest_checkpoint(broken) == os.path.join(broken, os.path.basename(complete))
    assert find_latest_checkpoint(str(tmp_path / "nothing")) is None


def test_checkpoint_config_errors():
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        CheckpointConfig(keep_last=0)


def test_alp_on_a_layer_range_saves_and_loads(reference, tmp_path):
    """Layers outside alp.perturb_start/end hold a frozen placeholder sigma, so Megatron can stack the
    parameter over all layers; only the perturbed layers' sigmas are trained, saved and loaded."""
    per_rank = run_ranks(2, save_then_load_a_layer_range, ParallelConfig(pipeline_parallel=2), reference,
                         str(tmp_path / "ckpt"))
    trained = {layer: v for rank in per_rank for layer, v in rank["trained"].items()}
    loaded = {layer: v for rank in per_rank for layer, v in rank["loaded"].items()}
    assert sorted(trained) == [1, 2]  # the perturbed layers, one on each pipeline stage
    assert loaded == trained
