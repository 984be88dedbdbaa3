"""The run config's cross-section checks (alp_megatron/config.py): each names the field and the fix."""

import pytest

from alp_megatron.config import load_run_config
from alp_megatron.errors import ConfigError


@pytest.mark.parametrize("method", ["bypass", "grpo", "tis", "mis", "gspo"])
def test_a_baseline_with_the_perturbation_on_is_refused(method):
    with pytest.raises(ConfigError, match="alp.enabled") as error:
        load_run_config(None, (f"loss.method={method}",))
    assert "alp.enabled=false" in str(error.value)
    config = load_run_config(None, (f"loss.method={method}", "alp.enabled=false"))
    assert not config.alp.enabled


def test_alp_methods_keep_the_perturbation():
    for method in ("alp_seq", "alp_token"):
        assert load_run_config(None, (f"loss.method={method}",)).alp.enabled


@pytest.mark.parametrize("override,field", [
    ("rollout.engine_temperature=0", "rollout.engine_temperature"),
    ("model.tiny_num_layers=0", "model.tiny_num_layers"),
    ("alp.target=embeddings", "alp.target"),
    ("actor.temperature=0.7", "actor.temperature"),
    ("weight_sync.fp8_scale_format=e8m0", "weight_sync.fp8_scale_format"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_run_config(None, (override,))


def test_engine_temperature_is_a_deliberate_mismatch_the_trainer_does_not_follow():
    config = load_run_config(None, ("rollout.engine_temperature=1.2",))
    assert config.rollout.engine_temperature == 1.2
    assert config.actor.temperature == config.rollout.sampling.temperature == 1.0


def test_fp8_settings_reach_the_run_config():
    config = load_run_config(None, ("weight_sync.fp8_scale_format=ue8m0",
                                    "weight_sync.fp8_ignored_layers=[lm_head,mlp.gate]"))
    assert config.weight_sync.fp8_scale_format == "ue8m0"
    assert tuple(config.weight_sync.fp8_ignored_layers) == ("lm_head", "mlp.gate")
