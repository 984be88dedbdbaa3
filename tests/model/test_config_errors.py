"""Bad configuration fails at start with one error that names the field and the fix."""

import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.provider import ModelConfig, ParallelConfig
from tests.tiny_models import hf_config

LLAMA = ModelArch.from_hf_config(hf_config("LlamaForCausalLM"))  # 4 layers, 4 heads, 2 kv heads
MOE = ModelArch.from_hf_config(hf_config("Qwen3MoeForCausalLM"))  # 4 experts


def expect(field: str, build):
    with pytest.raises(ConfigError) as error:
        build()
    assert error.value.field == field
    assert "Fix:" in str(error.value) and field in str(error.value)


def test_sequence_parallel_without_tensor_parallel():
    expect("parallel.sequence_parallel", lambda: ParallelConfig(sequence_parallel=True))


def test_layers_not_divisible_by_pipeline_stages():
    expect("parallel.pipeline_parallel", lambda: ParallelConfig(pipeline_parallel=3).check_model(LLAMA))
    expect("parallel.pipeline_parallel",
           lambda: ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=4).check_model(LLAMA))


def test_heads_not_divisible_by_tensor_parallel():
    expect("parallel.tensor_parallel", lambda: ParallelConfig(tensor_parallel=4).check_model(LLAMA))


def test_experts_not_divisible_by_expert_parallel():
    expect("parallel.expert_parallel", lambda: ParallelConfig(expert_parallel=3).check_model(MOE))
    expect("parallel.expert_parallel", lambda: ParallelConfig(expert_parallel=2).check_model(LLAMA))


def test_world_size_not_divisible_by_model_parallel():
    expect("parallel", lambda: ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel_size(6))
    assert ParallelConfig(tensor_parallel=2).data_parallel_size(4) == 2


def test_unknown_choices_and_fp8_without_transformer_engine():
    expect("model.dtype", lambda: ModelConfig(dtype="float16"))
    expect("model.backend", lambda: ModelConfig(backend="apex"))
    expect("model.fp8", lambda: ModelConfig(fp8="e4m3"))


def test_unsupported_architecture():
    expect("model.architectures", lambda: ModelArch.from_hf_config(hf_config("GPT2LMHeadModel")))


def test_unknown_loss_method_lists_the_choices():
    from alp_megatron.alp.loss import LossConfig

    with pytest.raises(ConfigError) as error:
        LossConfig(method="ppo")
    assert "alp_seq" in str(error.value) and "loss.method" in str(error.value)
