"""The run config's cross-section checks (alp_megatron/config.py): each names the field and the fix."""

import os

import pytest

from alp_megatron.config import load_run_config
from alp_megatron.errors import ConfigError


@pytest.mark.parametrize("method", ["bypass", "grpo", "tis", "seq_tis", "mis", "token_mis", "icepop", "gspo"])
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
    # checked at load, not when the servers start or the first sync runs
    ("rollout.server_tp_size=0", "rollout.server_tp_size"),
    ("rollout.server_dtype=fp7", "rollout.server_dtype"),
    ("rollout.server_mem_fraction=1.5", "rollout.server_mem_fraction"),
    ("rollout.host=0.0.0.0", "rollout.host"),
    ("rollout.startup_timeout_s=-1", "rollout.startup_timeout_s"),
    ("rollout.groups_in_flight=0", "rollout.groups_in_flight"),
    ("rollout.server_urls=[localhost:30000]", r"rollout.server_urls[0]"),
    ("rollout.router_url=localhost:31000", "rollout.router_url"),
    ("weight_sync.fp8=bogus", "weight_sync.fp8"),
    ("weight_sync.pause_mode=bogus", "weight_sync.pause_mode"),
    ("weight_sync.retries=-1", "weight_sync.retries"),
    ("weight_sync.verify_every=-1", "weight_sync.verify_every"),
    ("weight_sync.rollout_precision=fp4", "weight_sync.rollout_precision"),
    ("weight_sync.disk.keep=0", "weight_sync.disk.keep"),
    ("weight_sync.distributed.backend=mpi", "weight_sync.distributed.backend"),
    ("data.seed=-1", "data.seed"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"),
    ("model.megatron.extra={bogus_field: 1}", "model.megatron.extra"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, (override,))
    assert error.value.field == field, str(error.value)


def test_a_token_budget_that_cannot_hold_the_longest_sample_names_both_numbers():
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ("actor.max_tokens_per_microbatch=1000", "data.max_prompt_tokens=512",
                               "rollout.sampling.max_new_tokens=1024"))
    assert error.value.field == "actor.max_tokens_per_microbatch"
    assert "512" in str(error.value) and "1024" in str(error.value) and "at least 1536" in error.value.fix
    with pytest.raises(ConfigError, match="actor.max_tokens_per_microbatch"):
        load_run_config(None, ("actor.max_tokens_per_microbatch=0",))
    with pytest.raises(ConfigError, match="actor.max_tokens_per_microbatch"):
        load_run_config(None, ("actor.max_tokens_per_microbatch=big",))
    for budget in ("auto", "null"):  # not built in the trainer: refused, padded or packed
        with pytest.raises(ConfigError, match="does not split sequences over context-parallel ranks") as error:
            load_run_config(None, ("parallel.context_parallel=2", f"actor.max_tokens_per_microbatch={budget}"))
        assert error.value.field == "parallel.context_parallel"
    assert load_run_config(None, ()).actor.max_tokens_per_microbatch == "auto"  # packed by default
    config = load_run_config(None, ("actor.max_tokens_per_microbatch=1536", "data.max_prompt_tokens=512",
                                    "rollout.sampling.max_new_tokens=1024"))
    assert config.actor.max_tokens_per_microbatch == 1536


def test_server_flags_the_config_owns_point_to_its_fields():
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ('rollout.server_extra_args=["--tp-size", "2"]',))
    assert error.value.field == "rollout.server_extra_args" and "set rollout.server_tp_size instead" in error.value.fix
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ('rollout.server_extra_args=["--port=30001"]',))
    assert "the trainer sets it" in error.value.fix
    # servers started outside (server_urls) take none of the launch settings, so none is checked
    config = load_run_config(None, ('rollout.server_urls=["http://10.0.0.5:30000"]', "rollout.host=0.0.0.0"))
    assert config.rollout.server_urls == ("http://10.0.0.5:30000",)


def test_a_label_reward_needs_a_label_field(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "2"}\n')
    dataset = ("data.toy_task=null", f"data.paths=[{data}]", "reward.function=math")
    with pytest.raises(ConfigError) as error:
        load_run_config(None, (*dataset, "data.label_field=null"))
    assert error.value.field == "data.label_field"
    with pytest.raises(ConfigError, match="reward.function=math"):  # the default reward of a dataset
        load_run_config(None, (*dataset[:2], "data.label_field=null"))
    assert load_run_config(None, dataset).data.label_field == "label"


def test_the_chosen_transport_gets_its_own_settings(tmp_path):
    config = load_run_config(None, ("weight_sync.transport=disk", f"weight_sync.disk.root={tmp_path}",
                                    "weight_sync.check_names=false"))
    assert config.weight_sync.transport_options() == {"root": str(tmp_path), "source_dir": None, "keep": 1}
    assert not config.weight_sync.check_names
    assert load_run_config(None, ()).weight_sync.transport_options() == {"max_parallel_engines": 8}


def test_engine_temperature_is_a_deliberate_mismatch_the_trainer_does_not_follow():
    config = load_run_config(None, ("rollout.engine_temperature=1.2",))
    assert config.rollout.engine_temperature == 1.2
    assert config.actor.temperature == config.rollout.sampling.temperature == 1.0


def test_fp8_settings_reach_the_run_config():
    config = load_run_config(None, ("weight_sync.fp8_scale_format=ue8m0",
                                    "weight_sync.fp8_ignored_layers=[lm_head,mlp.gate]"))
    assert config.weight_sync.fp8_scale_format == "ue8m0"
    assert tuple(config.weight_sync.fp8_ignored_layers) == ("lm_head", "mlp.gate")


@pytest.mark.parametrize("overrides,field,fix", [
    (("rollout.mode=disaggregated", "rollout.max_staleness=0"), "rollout.max_staleness", "use 1 or more"),
    (("rollout.max_staleness=2",), "rollout.max_staleness", "set mode=disaggregated"),
    (("rollout.mode=disaggregated", "rollout.max_staleness=2", "rollout.one_step_off=true"),
     "rollout.one_step_off", "choose one"),
    (("rollout.partial_rollouts=resume",), "rollout.partial_rollouts", "('continue', 'restart')"),
    (("rollout.mode=disaggregated", "rollout.max_staleness=1", "rollout.dynamic_sampling.max_gen_batches=2"),
     "rollout.dynamic_sampling", "one_step_off with dynamic sampling"),
    (("rollout.mode=disaggregated", "rollout.max_staleness=1", "rollout.partial_rollouts=restart"),
     "weight_sync.pause_mode", "pause_mode=abort"),
])
def test_asynchronous_settings_that_cannot_work_name_the_field_and_the_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, overrides)
    assert error.value.field == field and fix in error.value.fix, str(error.value)
    config = load_run_config(None, ("rollout.mode=disaggregated", "rollout.max_staleness=2",
                                    "rollout.partial_rollouts=restart", "weight_sync.pause_mode=abort"))
    assert config.rollout.max_staleness == 2


def test_fp8_rollouts_that_cannot_run_are_refused_naming_the_field_and_the_fix():
    from alp_megatron.bridge.weight_update import check_rollout_precision
    from alp_megatron.model.arch import ModelArch
    from tests.tiny_models import hf_config

    for contradiction in (("weight_sync.rollout_precision=fp8", "weight_sync.fp8='off'"),
                          ("weight_sync.rollout_precision=fp8_rounded", "weight_sync.fp8='on'")):
        with pytest.raises(ConfigError) as error:
            load_run_config(None, contradiction)
        assert error.value.field == "weight_sync.fp8" and "leave weight_sync.fp8 at auto" in str(error.value)
    tiny = ModelArch.from_hf_config(hf_config())
    with pytest.raises(ConfigError) as error:  # a model the 128x128 blocks cannot hold
        check_rollout_precision("fp8", tiny, engine_tp_size=1, cuda_available=True)
    assert error.value.field == "weight_sync.rollout_precision"
    assert "q_proj rows per engine rank = 64" in str(error.value) and "fp8_rounded" in error.value.fix
    fits = ModelArch.from_hf_config(hf_config(hidden_size=256, intermediate_size=512, head_dim=64))
    with pytest.raises(ConfigError) as error:  # no FP8 kernels without a GPU
        check_rollout_precision("fp8", fits, engine_tp_size=1, cuda_available=False)
    assert "no GPU" in str(error.value) and "fp8_rounded" in error.value.fix
    check_rollout_precision("fp8", fits, engine_tp_size=1, cuda_available=True)
    check_rollout_precision("fp8_rounded", tiny, engine_tp_size=1, cuda_available=False)  # runs anywhere


def test_every_example_config_loads():
    import glob

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(paths) >= 4
    for path in paths:
        assert load_run_config(path).run.steps > 0, path
    moe = load_run_config(os.path.join(root, "cpu_tiny_moe.yaml"))
    assert moe.model.tiny_architecture == "Qwen3MoeForCausalLM" and moe.model.megatron.routing_replay == "rollout"
    with pytest.raises(ConfigError, match="model.tiny_architecture"):
        load_run_config(None, ("model.tiny_architecture=MixtralForCausalLM",))
