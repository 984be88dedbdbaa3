"""The study plan: which runs a study config expands to, regime by regime, and the overrides that make each
configuration."""

import os

import pytest

from alp_megatron.alp.loss import loss_methods
from alp_megatron.config import load_run_config
from alp_megatron.errors import ConfigError
from alp_megatron.study.plan import (
    ABLATIONS, METHODS, RegimeConfig, StudyConfig, configuration_overrides, layer_third, load_study_config,
    plan_runs,
)

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "off_policy_study.yaml")


def test_the_study_knows_every_loss_method():
    assert set(METHODS) == set(loss_methods())


def test_every_configuration_is_a_valid_run_config():
    """Each method and ablation's overrides load as an alp-train config (the baselines with ALP off)."""
    for configuration in METHODS + ABLATIONS:
        config = load_run_config(None, tuple(configuration_overrides(configuration, 3)) + ("model.tiny_num_layers=3",))
        assert config.alp.enabled == (configuration not in ("bypass", "grpo", "tis", "seq_tis", "mis", "token_mis",
                                                            "icepop", "gspo"))
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
    runs = plan_runs(study, "bf16", num_layers=3)
    assert len(runs) == 2 * (len(METHODS) + len(ABLATIONS))
    assert len({run.name for run in runs}) == len(runs)
    assert (runs[0].configuration, runs[0].seed) == ("bypass", 0)  # the gate's probe first
    late = next(r for r in runs if r.configuration == "late_third" and r.seed == 1)
    assert {"alp.perturb_start=2", "alp.perturb_end=3", "run.steps=7", "data.seed=1", "rollout.sampling.seed=1",
            "actor.num_mini_batches=4", "rollout.server_dtype=bfloat16", "data.prompts_per_step=8"} <= set(late.overrides)


def test_a_regime_brings_its_overrides_methods_configurations_and_escalation_levels():
    regime = RegimeConfig(overrides=("rollout.max_staleness=2",), num_mini_batches=1, steps=5, methods=("bypass", "alp_seq"),
                          ablations=(), configurations={"alp_own_routes": ["loss.method=alp_seq",
                                                                           "alp.replay_routes_when_perturbed=false"]},
                          escalation=(("rollout.engine_temperature=1.2",),))
    study = StudyConfig(seeds=(0,), regimes={"async_k2": regime})
    level0, level1 = plan_runs(study, "async_k2", 3), plan_runs(study, "async_k2", 3, level=1)
    assert [r.configuration for r in level0] == ["bypass", "alp_seq", "alp_own_routes"]
    assert all("rollout.max_staleness=2" in r.overrides and "actor.num_mini_batches=1" in r.overrides for r in level0)
    assert "alp.replay_routes_when_perturbed=false" in level0[2].overrides
    assert all("run.steps=5" in r.overrides for r in level0)  # its own steps, not the study's 30
    assert all("rollout.engine_temperature=1.2" in r.overrides and r.level == 1 for r in level1)
    assert not any("rollout.engine_temperature=1.2" in r.overrides for r in level0)
    assert level0[0].name == "async_k2/level0/bypass/seed0" and level1[0].name == "async_k2/level1/bypass/seed0"


def test_quick_runs_its_regimes_without_escalation():
    study = load_study_config(SHIPPED).quick_version()
    assert list(study.regimes) == ["bf16", "fp8_rounded"] and study.seeds == (0,)
    for name, regime in study.regimes.items():
        assert regime.escalation == () and regime.configurations == {} and regime.steps is None
        assert [r.configuration for r in plan_runs(study, name, 3)] == ["bypass", "alp_seq"]
    assert "weight_sync.rollout_precision=fp8_rounded" in plan_runs(study, "fp8_rounded", 3)[0].overrides


@pytest.mark.parametrize("override,field", [
    ("methods=[ppo]", "methods"), ("ablations=[first_half]", "ablations"), ("seeds=[]", "seeds"),
    ("regimes.bf16.engine_dtype=int8", "regimes.bf16.engine_dtype"), ("steps=0", "steps"),
    ("regimes.bf16.num_mini_batches=0", "regimes.bf16.num_mini_batches"), ("methods=[bypass,grpo]", "ablations"),
    ("stepz=3", "stepz"), ("quick.steps=0", "quick.steps"), ("quick.seeds=[]", "quick.seeds"),
    ("regimes.bf16.overridez=[]", "regimes.bf16.overridez"), ("quick.regimes=[fp4]", "quick.regimes"),
    ("regimes.bf16.methods=[grpo]", "regimes.bf16.methods"), ("gate.probe=ppo", "gate.probe"),
    ("regimes.bf16.configurations={grpo: [loss.method=grpo]}", "regimes.bf16.configurations.grpo"),
    ("regimes.bf16.configurations={../x: [loss.method=grpo]}", "regimes.bf16.configurations.../x"),
    ("methods=[grpo,alp_seq]", "methods"), ("quick.methods=[grpo,alp_seq]", "quick.methods"),
])
def test_bad_study_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as error:
        load_study_config(None, (override,))
    assert error.value.field == field


def test_the_shipped_study_config_loads_and_every_regime_is_a_valid_run_config():
    from alp_megatron.study.runner import RUNNER_OVERRIDES, regime_run_config

    study = load_study_config(SHIPPED)
    assert len(study.seeds) >= 3 and set(study.methods) == set(METHODS) and set(study.ablations) == set(ABLATIONS)
    assert {"bf16", "fp8_rounded", "async_k1", "async_k2", "async_k4", "moe_replay_off", "moe_replay_on",
            "multi_turn"} <= set(study.regimes)
    for name in study.regimes:
        config = regime_run_config(study, name)
        for spec in plan_runs(study, name, 3):
            load_run_config(study.regimes[name].run_config or study.run_config, (*spec.overrides, *RUNNER_OVERRIDES))
        assert config.parallel.tensor_parallel == 1 and config.parallel.expert_parallel == 1  # world size 1
        assert {study.gate.probe, "alp_seq"} <= set(study.regime_methods(name))  # the claims compare these two
    assert regime_run_config(study, "async_k4").rollout.max_staleness == 4
    assert regime_run_config(study, "moe_replay_on").model.megatron.routing_replay == "rollout"
    assert regime_run_config(study, "multi_turn").rollout.agent is not None
