"""The Transformer Engine spec (GPU only): TE layers with the ALP wrapper, FP8 blockwise.

On a machine without CUDA and Transformer Engine these tests skip with the reason; they have not run on
a GPU yet (see benchmarks/RESULTS.md for where GPU results are recorded).
"""

import pytest
import torch

pytestmark = [pytest.mark.megatron, pytest.mark.gpu]


def _transformer_engine_missing():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Transformer Engine and FP8 kernels do not run on CPU)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:  # a half-installed TE raises OSError/RuntimeError
        return f"Transformer Engine is not importable: {error}"
    return None


skip_reason = _transformer_engine_missing()
requires_te = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def _build(alp_on: bool, fp8):
    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
    from tests.tiny_models import hf_config

    initialize_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(1234)
    arch = ModelArch.from_hf_config(hf_config("Qwen3ForCausalLM", hidden_size=128, intermediate_size=256,
                                              head_dim=32))
    model_cfg = ModelConfig(backend="transformer_engine", dtype="bfloat16", fp8=fp8)
    return arch, build_model(arch, ParallelConfig(), model_cfg, PerturbationConfig(enabled=alp_on))[0].cuda()


@requires_te
@pytest.mark.parametrize("fp8", [None, "e4m3"])
def test_te_spec_perturbs_in_training_and_not_in_eval(fp8):
    from alp_megatron.alp.perturbation import alp_disabled, set_microbatch

    arch, model = _build(True, fp8)
    tokens = torch.randint(0, arch.vocab_size, (2, 128), device="cuda")
    positions = torch.arange(128, device="cuda").expand(2, -1)
    set_microbatch(model, 0, [0, 1])
    perturbed = model(tokens, positions, None)
    with alp_disabled(model):
        clean = model(tokens, positions, None)
    assert not torch.equal(perturbed, clean)
    model.eval()
    assert torch.equal(model(tokens, positions, None), clean)
    assert all(m.log_sigma.dtype == torch.float32 for m in model.modules() if hasattr(m, "log_sigma"))


def test_te_backend_without_transformer_engine_is_a_clear_error():
    if skip_reason is None:
        pytest.skip("Transformer Engine is installed here")
    pytest.importorskip("megatron.core")
    from alp_megatron.alp.layer_spec import _require_transformer_engine
    from alp_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="model.backend"):
        _require_transformer_engine()
