"""``alp-convert`` end to end: HF -> Megatron at TP=2 under torchrun, back to HF on one rank (another
layout), files bit-identical to the input; bad input stops with one clear message and writes nothing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from alp_megatron import convert
from alp_megatron.model.tiny import save_tiny_model

pytestmark = pytest.mark.megatron

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run(*args, ranks=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + ["-m", "alp_megatron.convert", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".partial-" in name]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # vocab 51: padded to 52 rows at TP=2, 51 at TP=1, so the checkpoint is resharded across paddings
    return save_tiny_model(str(tmp_path_factory.mktemp("input") / "hf"), "LlamaForCausalLM", seed=0,
                           vocab_size=51, num_hidden_layers=2)


@pytest.fixture(scope="module")
def round_trip(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    ckpt, out = str(root / "ckpt"), str(root / "hf_out")
    to_mcore = run("hf-to-mcore", "--hf", hf_dir, "--out", ckpt, "--tp", "2", "--pp", "1", "--progress-every-s", "0",
                   ranks=2)
    assert to_mcore.returncode == 0, to_mcore.stderr[-3000:]
    to_hf = run("mcore-to-hf", "--ckpt", ckpt, "--out", out)
    assert to_hf.returncode == 0, to_hf.stderr[-3000:]
    return root, ckpt, out, (to_mcore.stderr, to_hf.stderr)


def test_checkpoint_holds_megatron_shards_and_the_hf_side_files(round_trip):
    root, ckpt, _, _ = round_trip
    assert os.path.isfile(os.path.join(ckpt, "metadata.json"))
    assert any(name.endswith(".distcp") for name in os.listdir(ckpt))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(ckpt, "hf", name))
    assert not leftovers(str(root))


def test_round_trip_through_another_layout_gives_bit_identical_files(hf_dir, round_trip):
    _, _, out, _ = round_trip
    assert sorted(os.listdir(out)) == sorted(os.listdir(hf_dir))
    for name in os.listdir(hf_dir):
        with open(os.path.join(hf_dir, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs"
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    converted = load_file(os.path.join(out, "model.safetensors"))
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)


def test_progress_lines_come_from_rank_0_only_and_end_at_the_whole_model(round_trip):
    _, ckpt, out, (to_mcore, to_hf) = round_trip
    lines = [line for line in to_mcore.splitlines() if line.startswith("alp-convert: ")]
    loading = [line for line in lines if "loading rank 0's shards of the HF weights" in line]
    assert len(loading) >= 3, lines  # every 0 s: a line per parameter, then the closing one
    assert "(100 %) in " in loading[-1] and all("(100 %)" not in line for line in loading[:-1]), loading
    assert sum(line.endswith(f"writing the Megatron checkpoint {ckpt} ...") for line in lines) == 1, lines
    assert sum(f"writing the Megatron checkpoint {ckpt}: done in " in line for line in lines) == 1, lines
    # the default every 10 s: only the closing lines of this small model
    written = [line for line in to_hf.splitlines() if line.startswith(f"alp-convert: gathering and writing the HF "
                                                                     f"folder {out}")]
    assert len(written) == 1 and "(100 %) in " in written[0], to_hf[-2000:]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one message naming the file or flag and the fix, exit status 2, nothing written


def fails(capsys, *args):
    assert convert.main(list(args)) == 2
    return capsys.readouterr().err


def test_missing_config(hf_dir, tmp_path, capsys):
    folder = tmp_path / "no_config"
    shutil.copytree(hf_dir, folder)
    os.remove(folder / "config.json")
    error = fails(capsys, "hf-to-mcore", "--hf", str(folder), "--out", str(tmp_path / "ckpt"), "--tp", "1", "--pp", "1")
    assert "config.json" in error and "does not exist" in error and "Fix:" in error
    assert not os.path.exists(tmp_path / "ckpt")


def test_unsupported_architecture(hf_dir, tmp_path, capsys):
    folder = tmp_path / "mistral"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    error = fails(capsys, "hf-to-mcore", "--hf", str(folder), "--out", str(tmp_path / "ckpt"), "--tp", "1", "--pp", "1")
    assert "model.architectures" in error and "MistralForCausalLM" in error and "Qwen3MoeForCausalLM" in error
    assert not os.path.exists(tmp_path / "ckpt")


def test_world_size_that_does_not_match_the_layout(hf_dir, tmp_path, capsys):
    error = fails(capsys, "hf-to-mcore", "--hf", hf_dir, "--out", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "1")
    assert "--tp/--pp/--ep" in error and "1 ranks were launched" in error and "--nproc_per_node 2" in error
    assert not os.path.exists(tmp_path / "ckpt")


def test_existing_output_and_missing_checkpoint(hf_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    error = fails(capsys, "hf-to-mcore", "--hf", hf_dir, "--out", str(taken), "--tp", "1", "--pp", "1")
    assert str(taken) in error and "not empty" in error
    assert os.listdir(taken) == ["keep.txt"]
    error = fails(capsys, "mcore-to-hf", "--ckpt", hf_dir, "--out", str(tmp_path / "out"))
    assert "metadata.json" in error and "hf-to-mcore" in error
    assert not os.path.exists(tmp_path / "out") and not leftovers(str(tmp_path))


def test_mis_shaped_tensor_writes_nothing(hf_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(hf_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = run("hf-to-mcore", "--hf", str(folder), "--out", str(tmp_path / "ckpt"), "--tp", "1", "--pp", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.layers.1.mlp.down_proj.weight is [64, 100]" in result.stderr and "needs [64, 128]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "ckpt") and not leftovers(str(tmp_path))
