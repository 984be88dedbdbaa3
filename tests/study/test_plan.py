"""The study plan: which runs a study config expands to, and the overrides that make each configuration."""

import pytest

from alp_megatron.config import load_run_config
from alp_megatron.errors import ConfigError
from alp_megatron.study.plan import (
    ABLATIONS, METHODS, StudyConfig, configuration_overrides, layer_third, load_study_config, plan_runs,
)


def test_every_configuration_is_a_valid_run_config():
    """Each method and ablation's overrides load as an alp-train config (the baselines with ALP off)."""
    for configuration in METHODS + ABLATIONS:
        config = load_run_config(None, tuple(configuration_overrides(configuration, 3)) + ("model.tiny_num_layers=3",))
        assert config.alp.enabled == (configuration not in ("bypass", "grpo", "tis", "mis", "gspo"))
    logits = load_run_config(None, tuple(configuration_overrides("logits_only", 3)))
    assert logits.alp.target == "logits" and logits.loss.method == "alp_seq"


def test_thirds_cover_the_layers_once():
    for layers in (3, 6, 7, 12):
        thirds = [layer_third(i, layers) for i in range(3)]
        assert thirds[0][0] == 0 and thirds[-1][1] == layers
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(thirds, thirds[1:]))
    with pytest.raises(ConfigError, match="model.tiny_num_layers"):
        layer_third(0, 2)


def test_plan_runs_every_configuration_per_seed_with_seeded_overrides():
    study = StudyConfig(seeds=(0, 1), steps=7, overrides=("data.prompts_per_step=8",))
    runs = plan_runs(study, num_layers=3)
    assert len(runs) == 2 * (len(METHODS) + len(ABLATIONS))
    assert len({run.name for run in runs}) == len(runs)
    late = next(r for r in runs if r.configuration == "late_third" and r.seed == 1)
    assert {"alp.perturb_start=2", "alp.perturb_end=3", "run.steps=7", "data.seed=1", "rollout.sampling.seed=1",
            "actor.num_mini_batches=4", "data.prompts_per_step=8"} <= set(late.overrides)


def test_quick_runs_one_seed_of_three_methods():
    quick = StudyConfig().quick_version()
    assert quick.seeds == (0,) and quick.methods == ("bypass", "grpo", "alp_seq") and quick.ablations == ()
    assert len(plan_runs(quick, 3)) == 3


@pytest.mark.parametrize("override,field", [
    ("methods=[ppo]", "methods"), ("ablations=[first_half]", "ablations"), ("seeds=[]", "seeds"),
    ("off_policy.engine_dtype=int8", "off_policy.engine_dtype"), ("steps=0", "steps"),
    ("off_policy.num_mini_batches=0", "off_policy.num_mini_batches"), ("methods=[grpo]", "ablations"),
    ("stepz=3", "stepz"), ("quick.steps=0", "quick.steps"), ("quick.seeds=[]", "quick.seeds"),
])
def test_bad_study_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_study_config(None, (override,))


def test_the_shipped_study_config_loads():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "off_policy_study.yaml")
    study = load_study_config(path)
    assert len(study.seeds) >= 3 and set(study.methods) == set(METHODS) and set(study.ablations) == set(ABLATIONS)
