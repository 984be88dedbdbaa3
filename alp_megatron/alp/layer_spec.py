"""ALP decoder specs for Megatron-Core: Megatron's own GPT specs with the layer class swapped.

Each decoder layer spec keeps its submodules (local or Transformer Engine, dense or MoE) and gets
``module = ALP<LayerClass>``: a subclass whose only change is perturbing ``hidden_states`` on entry, before
the input norm, so the noise enters the residual stream. The TE spec fuses the input norm into
``linear_qkv``; this hook sits before the layer and so works the same for both backends.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from alp_megatron.alp.perturbation import LayerPerturbation, NoiseSource, PerturbationConfig, SequenceShard
from alp_megatron.errors import ConfigError

Backend = Literal["local", "transformer_engine"]


class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm for the local spec, usable with sequence parallelism.

    Megatron's ``WrappedTorchNorm`` refuses SP although the norm is elementwise over the hidden dimension;
    the only SP requirement is that the weight gradients, partial per rank, are summed over the
    tensor-parallel group, which Megatron's DDP does for parameters marked ``sequence_parallel``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ConfigError(
                "model.normalization", f"{config.normalization!r} is not supported by the local spec",
                "use LayerNorm or RMSNorm",
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@functools.lru_cache(maxsize=None)
def alp_layer_class(base: type) -> type:
    """``base`` (a TransformerLayer class) with the ALP perturbation applied to its input."""

    class ALPLayer(base):
        def __init__(self, *args, alp_source: NoiseSource, alp_config: PerturbationConfig, **kwargs):
            super().__init__(*args, **kwargs)
            layer_index = self.layer_number - 1  # Megatron's layer_number is global and 1-based
            self.alp = None
            # Every layer gets the module (inactive outside perturb_start/end), none when ALP is off or
            # perturbs the logits: Megatron checkpoints a layer parameter stacked over all layers.
            if alp_config.enabled and alp_config.target == "layers":
                shard = SequenceShard(
                    tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                    sequence_parallel=self.config.sequence_parallel,
                    cp_rank=parallel_state.get_context_parallel_rank(),
                    cp_size=parallel_state.get_context_parallel_world_size(),
                )
                self.alp = LayerPerturbation(
                    alp_source, layer_index, shard, alp_config.sigma_0, alp_config.learnable,
                    sequence_parallel=self.config.sequence_parallel,
                    active=alp_config.perturbs(layer_index, self.config.num_layers),
                )

        def forward(self, *args, **kwargs):
            if self.alp is not None:
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = self.alp(kwargs["hidden_states"])
                else:
                    args = (self.alp(args[0]), *args[1:])
            return super().forward(*args, **kwargs)

    ALPLayer.__name__ = ALPLayer.__qualname__ = f"ALP{base.__name__}"
    return ALPLayer


def check_alp_compatible(config: TransformerConfig) -> None:
    """Refuse settings under which the perturbation would be skipped or frozen silently (ALP.md §6)."""
    graphs = getattr(config, "cuda_graph_impl", "none") != "none" or getattr(config, "enable_cuda_graph", False)
    graphs = graphs or getattr(config, "external_cuda_graph", False)
    if graphs:
        raise ConfigError(
            "model.cuda_graph_impl",
            "CUDA-graph capture of the training layers replays fixed noise or bypasses the ALP forward",
            "set cuda_graph_impl='none' (and enable_cuda_graph/external_cuda_graph false) while ALP is on, "
            "or set alp.enabled=false",
        )


def alp_decoder_block_spec(
    config: TransformerConfig,
    alp_config: PerturbationConfig,
    source: NoiseSource,
    backend: Backend = "local",
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Megatron's GPT decoder block spec for this pipeline stage, with every layer made an ALP layer.

    The local backend also gets :class:`SequenceParallelTorchNorm` for the layer and final norms.
    """
    alp_config.check_layers(config.num_layers)
    if alp_config.enabled:
        check_alp_compatible(config)
    source.replays_recompute = config.recompute_granularity == "full"
    use_te = backend == "transformer_engine"
    if use_te:
        _require_transformer_engine()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )
    layer_specs = [_alp_layer_spec(spec, alp_config, source, use_te) for spec in block.layer_specs]
    final_norm = block.layer_norm if use_te else SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


def _alp_layer_spec(spec: ModuleSpec, alp_config: PerturbationConfig, source: NoiseSource,
                    use_te: bool) -> ModuleSpec:
    submodules = spec.submodules
    if not use_te:
        submodules = dataclasses.replace(
            submodules,
            input_layernorm=_sp_norm_if_norm(submodules.input_layernorm),
            pre_mlp_layernorm=_sp_norm_if_norm(submodules.pre_mlp_layernorm),
        )
        attention = submodules.self_attention
        if isinstance(attention, ModuleSpec) and hasattr(attention.submodules, "q_layernorm"):
            attention = dataclasses.replace(
                attention,
                submodules=dataclasses.replace(
                    attention.submodules,
                    q_layernorm=_qk_norm(attention.submodules.q_layernorm),
                    k_layernorm=_qk_norm(attention.submodules.k_layernorm),
                ),
            )
            submodules = dataclasses.replace(submodules, self_attention=attention)
    return dataclasses.replace(
        spec,
        module=alp_layer_class(spec.module),
        params={**spec.params, "alp_source": source, "alp_config": alp_config},
        submodules=submodules,
    )


def _sp_norm_if_norm(slot):
    from megatron.core.transformer.identity_op import IdentityOp

    return slot if slot is IdentityOp else SequenceParallelTorchNorm


def _qk_norm(slot):
    """q/k norms see full sequences of this rank's heads; plain torch norms are right for them."""
    from megatron.core.transformer.identity_op import IdentityOp

    return slot if slot is IdentityOp else _QKTorchNorm


class _QKTorchNorm:
    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            return torch.nn.RMSNorm(hidden_size, eps=eps)
        return torch.nn.LayerNorm(hidden_size, eps=eps)


def _require_transformer_engine() -> None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:  # a half-installed TE raises OSError/RuntimeError
        raise ConfigError(
            "model.backend",
            f"'transformer_engine' needs Transformer Engine, which failed to import ({error})",
            "install the gpu extra (pip install 'alp-megatron[gpu]') on a CUDA machine, or use backend 'local'",
        ) from error
