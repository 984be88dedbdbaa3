"""``alp-train --check-config``: the config, the model folder and the reward function checked without starting
anything; overrides may come before or after the options."""

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "cpu_tiny.yaml")


def alp_train(*args):
    return subprocess.run([sys.executable, "-m", "alp_megatron.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_check_config_prints_the_resolved_config_with_overrides_on_either_side_of_the_options(tmp_path):
    result = alp_train("--config", CONFIG, "run.steps=7", "--output-dir", str(tmp_path / "run"), "data.seed=3",
                       "--check-config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert (resolved["run"]["steps"], resolved["run"]["output_dir"], resolved["data"]["seed"]) == (
        7, str(tmp_path / "run"), 3)
    assert not os.path.exists(tmp_path / "run")  # nothing started, nothing written


def test_check_config_refuses_a_missing_model_folder_and_an_unknown_reward(tmp_path):
    result = alp_train("--config", CONFIG, f"model.hf_path={tmp_path}", "--check-config")
    assert result.returncode == 2 and "model.hf_path" in result.stderr and "config.json" in result.stderr
    result = alp_train("--config", CONFIG, "reward.function=no_such_reward", "--check-config")
    assert result.returncode == 2 and "reward.function" in result.stderr and "Traceback" not in result.stderr
