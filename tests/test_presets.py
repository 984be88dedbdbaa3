"""examples/presets: each loads, and holds the settings of the authors' script it names."""

import glob
import os

import pytest

from alp_megatron.config import load_run_config

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "presets")
SHARED = dict(lr=1e-6, prompts=512, n=8, mini_batches=16, response=2048, agg="token_mean", kl=(0.001, "k3"))
EXPECTED = {  # preset: (loss.method, clip range, dual clip c, ALP on, method options)
    "single_turn_alp": ("alp_seq", (0.5, 3.0), 10.0, True, {}),
    "single_turn_bypass": ("bypass", (0.5, 3.0), 10.0, False, {}),
    "single_turn_grpo": ("grpo", (0.2, 0.28), 10.0, False, {}),
    "single_turn_tis": ("seq_tis", (0.2, 0.28), 10.0, False, {"tis_cap": 5.0}),
    "single_turn_mis": ("mis", (0.2, 0.28), 10.0, False, {"mis_low": 0.0, "mis_high": 5.0,
                                                          "mis_weight": "importance"}),
    "single_turn_gspo": ("gspo", (3e-4, 4e-4), 100.0, False, {}),
}


def test_every_preset_is_checked_here():
    found = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRESETS, "single_turn_*.yaml"))}
    assert found == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_holds_its_scripts_settings(name):
    config = load_run_config(os.path.join(PRESETS, f"{name}.yaml"))
    method, clip, dual_c, alp_on, options = EXPECTED[name]
    loss = config.loss
    assert (loss.method, loss.clip_range(), loss.dual_clip_c, config.alp.enabled) == (method, clip, dual_c, alp_on)
    assert {key: getattr(loss, key) for key in options} == options
    assert (loss.agg, (loss.kl_coef, loss.kl_estimator)) == (SHARED["agg"], SHARED["kl"])
    assert config.optimizer.lr == SHARED["lr"] and config.actor.num_mini_batches == SHARED["mini_batches"]
    assert (config.data.prompts_per_step, config.rollout.sampling.n) == (SHARED["prompts"], SHARED["n"])
    assert config.rollout.sampling.max_new_tokens == SHARED["response"]
    if alp_on:
        assert (config.alp.sigma_0, config.alp.sigma_lr) == (0.02, 0.01)
    assert config.model.hf_path  # from the Qwen3-8B example it is based on


MULTI_SHARED = dict(lr=1e-6, prompts=128, n=16, mini_batches=4, turns=5, turn_tokens=8000, observation=256)
MULTI = {  # preset: (loss.method, clip range, dual clip c, ALP on, method options)
    "multi_turn_alp": ("alp_seq", (0.5, 3.0), 3.0, True, {}),
    "multi_turn_bypass": ("bypass", (0.2, 0.28), 3.0, False, {}),
    "multi_turn_mis": ("mis", (0.2, 0.28), 3.0, False, {"mis_low": 0.0, "mis_high": 5.0,
                                                         "mis_weight": "importance"}),
    "multi_turn_gspo": ("gspo", (3e-4, 4e-4), 100.0, False, {}),
}


def test_every_multi_turn_preset_is_checked_here():
    found = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRESETS, "multi_turn_*.yaml"))}
    assert found == set(MULTI)


@pytest.mark.parametrize("name", sorted(MULTI))
def test_multi_turn_preset_holds_its_scripts_settings(name):
    config = load_run_config(os.path.join(PRESETS, f"{name}.yaml"))
    method, clip, dual_c, alp_on, options = MULTI[name]
    loss, agent = config.loss, config.rollout.agent
    assert (loss.method, loss.clip_range(), loss.dual_clip_c, config.alp.enabled) == (method, clip, dual_c, alp_on)
    assert {key: getattr(loss, key) for key in options} == options
    assert (loss.agg, loss.kl_coef) == ("token_mean", 0.0)
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.optimizer.adam_beta2) == (1e-6, 0.01, 0.99)
    assert config.actor.num_mini_batches == MULTI_SHARED["mini_batches"]
    assert (config.data.prompts_per_step, config.rollout.sampling.n) == (MULTI_SHARED["prompts"], MULTI_SHARED["n"])
    assert (agent.tool, agent.format, agent.max_turns, agent.max_turn_tokens, agent.observation_tokens,
            agent.mask_void) == ("python", "simpletir", 5, 8000, 256, True)
    if alp_on:
        assert (config.alp.sigma_0, config.alp.sigma_lr) == (1e-6, 5e-4)
    assert config.reward.function == "math" and config.model.hf_path
