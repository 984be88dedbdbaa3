"""Parallel state and the Megatron GPTModel (with the ALP spec) built from an HF architecture.

Call order on every rank: :func:`initialize_parallel` once, then :func:`build_model`. On a machine
without CUDA, :func:`initialize_parallel` applies the CPU runtime patches (``patches/megatron_core.py``)
and uses gloo; with CUDA it uses NCCL and applies none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from alp_megatron.alp.perturbation import NoiseSource, PerturbationConfig
from alp_megatron.errors import ConfigError
from alp_megatron.model.arch import ModelArch


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout; data parallelism is what the world size leaves over."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"parallel.{name}", f"must be an integer >= 1, got {value!r}", "use 1 or more")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError(
                "parallel.sequence_parallel", "sequence parallelism needs tensor_parallel > 1",
                "set parallel.tensor_parallel to 2 or more, or sequence_parallel=false",
            )
        if self.virtual_pipeline_parallel is not None and (
            self.virtual_pipeline_parallel < 2 or self.pipeline_parallel < 2
        ):
            raise ConfigError(
                "parallel.virtual_pipeline_parallel",
                f"{self.virtual_pipeline_parallel} needs >= 2 virtual stages and pipeline_parallel >= 2",
                "leave it unset, or use >= 2 with pipeline_parallel >= 2",
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ConfigError(
                "parallel",
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel x "
                f"context_parallel = {self.model_parallel_size}",
                "launch a multiple of that many ranks, or change the parallel sizes",
            )
        data_parallel = world_size // self.model_parallel_size
        expert_tp = self.expert_tensor_parallel or self.tensor_parallel
        if (self.expert_parallel * expert_tp) > world_size // self.pipeline_parallel or (
            (world_size // self.pipeline_parallel) % (self.expert_parallel * expert_tp)
        ):
            raise ConfigError(
                "parallel.expert_parallel",
                f"expert_parallel x expert_tensor_parallel = {self.expert_parallel * expert_tp} must divide the "
                f"{world_size // self.pipeline_parallel} ranks of a pipeline stage",
                "choose expert_parallel so that it divides world_size / pipeline_parallel",
            )
        return data_parallel

    def check_model(self, arch: ModelArch) -> None:
        """Raise if this layout does not divide the model."""
        stages = self.pipeline_parallel * (self.virtual_pipeline_parallel or 1)
        if arch.num_layers % stages:
            raise ConfigError(
                "parallel.pipeline_parallel",
                f"{arch.num_layers} layers cannot be split evenly into {stages} pipeline (x virtual) stages",
                "choose pipeline_parallel (x virtual_pipeline_parallel) dividing the number of layers",
            )
        for what, count in (("attention heads", arch.num_attention_heads),
                            ("key/value heads", arch.num_query_groups)):
            if count % self.tensor_parallel:
                raise ConfigError(
                    "parallel.tensor_parallel",
                    f"{count} {what} are not divisible by tensor_parallel={self.tensor_parallel}",
                    f"choose tensor_parallel dividing {count}",
                )
        if arch.is_moe and arch.num_experts % self.expert_parallel:
            raise ConfigError(
                "parallel.expert_parallel",
                f"{arch.num_experts} experts are not divisible by expert_parallel={self.expert_parallel}",
                f"choose expert_parallel dividing {arch.num_experts}",
            )
        if not arch.is_moe and self.expert_parallel > 1:
            raise ConfigError(
                "parallel.expert_parallel", f"{arch.architecture} is a dense model", "set expert_parallel=1"
            )


@dataclass(frozen=True)
class ModelConfig:
    """How the trainer runs the architecture."""

    backend: Literal["local", "transformer_engine"] = "local"
    dtype: Literal["float32", "bfloat16"] = "float32"
    recompute: Optional[Literal["full"]] = None
    recompute_num_layers: int = 1
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    routing_replay: Literal["none", "rollout"] = "none"  # MoE: replay the engine's routes (R3)
    routing_agreement: bool = False  # MoE without replay: fetch the engine's routes anyway, to report agreement
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["blockwise", "tensorwise", "delayed", "mxfp8"] = "blockwise"
    seed: int = 1234
    extra: dict = field(default_factory=dict)  # any other TransformerConfig field, passed through

    def __post_init__(self):
        choices = {
            "backend": ("local", "transformer_engine"),
            "dtype": ("float32", "bfloat16"),
            "recompute": (None, "full"),
            "moe_dispatcher": ("alltoall", "allgather"),
            "routing_replay": ("none", "rollout"),
            "fp8": (None, "e4m3", "hybrid"),
            "fp8_recipe": ("blockwise", "tensorwise", "delayed", "mxfp8"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}", f"{getattr(self, name)!r} is not one of {allowed}", "pick one of those"
                )
        if self.fp8 is not None and self.backend != "transformer_engine":
            raise ConfigError(
                "model.fp8", "FP8 training needs the Transformer Engine backend",
                "set model.backend=transformer_engine (GPU) or model.fp8=null",
            )
        if self.extra:
            import dataclasses

            from megatron.core.transformer import TransformerConfig

            unknown = sorted(set(self.extra) - {f.name for f in dataclasses.fields(TransformerConfig)})
            if unknown:
                raise ConfigError("model.megatron.extra", f"{', '.join(unknown)} is not a field of Megatron's "
                                  "TransformerConfig", "name TransformerConfig fields only (e.g. attention_dropout)")


def rank_device() -> torch.device:
    """This rank's device: the current GPU (the one :func:`initialize_parallel` set; NCCL's), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize_parallel(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> int:
    """Start torch.distributed (env:// from torchrun or a spawner) and Megatron's parallel state.

    Returns the data-parallel size. Every rank calls this once.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from alp_megatron._patches import megatron_core as megatron_core_patches

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    megatron_core_patches.apply()
    megatron_core_patches.apply_fixes()
    data_parallel = parallel.data_parallel_size(dist.get_world_size())
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return data_parallel


def transformer_config(arch: ModelArch, parallel: ParallelConfig, model: ModelConfig):
    """The one place our configs become Megatron's ``TransformerConfig``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.dtype == "bfloat16",
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel or parallel.tensor_parallel,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False,
        calculate_per_token_loss=True,
    )
    if parallel.virtual_pipeline_parallel is not None and parallel.pipeline_parallel == 2:
        # With 2 pipeline ranks next_rank == prev_rank, and the interleaved schedule's batched
        # send_forward_backward_recv_forward_backward posts two sends and two receives to the same peer in one
        # batch_isend_irecv; they pair in posting order and cross activations with gradients, silently
        # (Megatron-LM issues #750, #1450). The unbatched path uses one process group per direction.
        kwargs.update(batch_p2p_comm=False)
    if model.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=model.recompute_num_layers)
    if arch.is_moe:
        kwargs.update(
            # a per-layer list: HF's mlp_only_layers / decoder_sparse_step do not fit Megatron's integer form
            moe_layer_freq=[int(arch.layer_is_moe(i)) for i in range(arch.num_layers)],
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_token_dispatcher_type=model.moe_dispatcher,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_grouped_gemm=False,
        )
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    kwargs.update(model.extra)
    if model.routing_replay == "rollout":
        _check_replayable(arch, kwargs)
        kwargs.update(moe_enable_routing_replay=True)
    if model.routing_agreement and not arch.is_moe:
        raise ConfigError("model.megatron.routing_agreement", f"is true, but {arch.architecture} has no MoE layers",
                          "set model.megatron.routing_agreement=false")
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError, TypeError) as error:
        raise ConfigError("model", f"Megatron rejected the model settings: {error}",
                          "adjust the named setting in model / parallel") from error


def _check_replayable(arch: ModelArch, kwargs: dict) -> None:
    """Refuse routing replay where it would not happen, or would happen silently wrong."""
    if not arch.is_moe:
        raise ConfigError("model.megatron.routing_replay", f"is rollout, but {arch.architecture} has no MoE layers",
                          "set model.megatron.routing_replay=none")
    if kwargs.get("moe_router_fusion"):
        raise ConfigError("model.megatron.routing_replay", "is rollout, but model.megatron.extra sets "
                          "moe_router_fusion, whose fused top-k returns before Megatron's replay",
                          "drop moe_router_fusion")
    if kwargs.get("moe_router_load_balancing_type") == "sinkhorn":
        raise ConfigError("model.megatron.routing_replay", "is rollout, but sinkhorn load balancing picks experts "
                          "outside the replayed top-k", "use aux_loss or none load balancing")


def build_model(
    arch: ModelArch,
    parallel: ParallelConfig,
    model: ModelConfig = ModelConfig(),
    alp: PerturbationConfig = PerturbationConfig(),
) -> list:
    """This rank's model chunks (one per virtual pipeline stage), each a ``GPTModel`` with ALP layers.

    All chunks share one :class:`NoiseSource` (seeded by ``alp.seed``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from alp_megatron.alp.layer_spec import alp_decoder_block_spec
    from alp_megatron.model.packing import restart_rotary_positions

    parallel.check_model(arch)
    config = transformer_config(arch, parallel, model)
    source = NoiseSource(alp.seed)
    chunks = []
    vp_size = parallel.virtual_pipeline_parallel
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        spec = alp_decoder_block_spec(config, alp, source, backend=model.backend, vp_stage=stage)
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=padded_vocab_size(arch.vocab_size, parallel.tensor_parallel),
                max_sequence_length=arch.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=int(arch.rope_theta),
                rope_scaling=arch.rope_scaling_factor is not None,
                rope_scaling_factor=arch.rope_scaling_factor or 8.0,
                parallel_output=True,
                vp_stage=stage,
            )
        )
        if alp.perturbs_logits and chunks[-1].post_process:
            _perturb_logits(chunks[-1], arch, alp, source)
        _mask_padded_vocab(chunks[-1], arch.vocab_size)
        chunks[-1].alp_backend = model.backend  # how model.packing.forward runs a packed micro-batch
        chunks[-1].routing_replay = model.routing_replay == "rollout"  # and whether it replays MoE routes
        chunks[-1].replay_routes_when_perturbed = alp.replay_routes_when_perturbed
        if model.backend == "local":
            restart_rotary_positions(chunks[-1])
    return chunks


def _perturb_logits(chunk, arch: ModelArch, alp: PerturbationConfig, source: NoiseSource) -> None:
    """The logits-only ablation: a :class:`LogitsPerturbation` as ``chunk.alp`` (so its ``log_sigma`` is named
    ``alp.log_sigma``, like a layer's: optimised, checkpointed, never exported), applied to the output
    layer's vocab-parallel logits (the full sequence of this rank: the output layer gathers a
    sequence-parallel input)."""
    from megatron.core import parallel_state

    from alp_megatron.alp.perturbation import ColumnShard, LogitsPerturbation, SequenceShard

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = SequenceShard(cp_rank=parallel_state.get_context_parallel_rank(),
                          cp_size=parallel_state.get_context_parallel_world_size())
    columns = ColumnShard(start=tp_rank * (chunk.vocab_size // tp_size), full_width=arch.vocab_size)
    chunk.alp = LogitsPerturbation(source, arch.num_layers, shard, alp.sigma_0, columns, alp.learnable,
                                   tp_group=parallel_state.get_tensor_model_parallel_group())

    def perturb(module, inputs, output):
        logits, bias = output
        return chunk.alp(logits), bias

    chunk.output_layer.register_forward_hook(perturb)


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Rows of the Megatron embedding and output layer: ``vocab_size`` rounded up to a multiple of the
    tensor-parallel size (vocab-parallel layers split the rows evenly). The padded rows hold zeros."""
    return -(-vocab_size // tensor_parallel) * tensor_parallel


def _mask_padded_vocab(chunk, vocab_size: int) -> None:
    """Give the padded vocabulary columns a logit far below any real one, so softmax, logprobs and
    entropy over the padded vocabulary equal those over the real one (zero rows would give logit 0)."""
    output_layer = getattr(chunk, "output_layer", None)
    padded = chunk.vocab_size
    if output_layer is None or padded == vocab_size:
        return

    def mask(module, inputs, output):
        logits, bias = output
        columns = logits.shape[-1]
        # the gathered logits span the padded vocabulary; a vocab-parallel shard starts at its rank's offset
        start = 0 if columns == padded else module.tp_group.rank() * columns
        index = torch.arange(start, start + columns, device=logits.device)
        # the value logprobs.mask_padded_vocab uses: exp() of it is 0, and it stays finite (0 * it = 0, not
        # NaN, in an entropy) even divided by a small sampling temperature
        return logits.masked_fill(index >= vocab_size, -1e9), bias

    output_layer.register_forward_hook(mask)
