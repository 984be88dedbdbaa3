"""Rank-side code of ``test_megatron_core.py``: small real megatron-core scenarios, one per CPU patch.

Every entry point runs in a fresh process spawned by ``tests.distributed.run_ranks`` (the patches are
process-global): it first calls ``apply(exclude=...)`` (before anything else could apply them), then
starts gloo and Megatron's parallel state and runs the scenario. A scenario returns a small dict of
facts the test checks; a scenario that megatron-core cannot run raises megatron's own error.
"""

from __future__ import annotations

import os
import traceback

import torch

SEQ = 8


def _apply(exclude=()) -> tuple:
    from alp_megatron._patches import megatron_core

    return megatron_core.apply(exclude=exclude)


def _init_parallel(**sizes) -> None:
    """gloo + Megatron's parallel state, without seeding the RNG tracker (that is P3's scenario)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.get("tensor_parallel", 1),
        expert_model_parallel_size=sizes.get("expert_parallel", 1),
    )


def _initialize(**sizes) -> None:
    """The project's own start-up: gloo, parallel state and the seeded RNG tracker."""
    from alp_megatron.model.provider import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(**sizes), seed=1234)


def _model(architecture: str, parallel, **model_settings):
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import ModelConfig, build_model
    from tests.tiny_models import hf_config

    arch = ModelArch.from_hf_config(hf_config(architecture, num_hidden_layers=2))
    torch.manual_seed(1234)
    return build_model(arch, parallel, ModelConfig(**model_settings))[0], arch


def _tokens(vocab: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return tokens, position_ids


# ----------------------------------------------------------------------------------------------
# one scenario per patch


def p1_memory_buffer_and_forward() -> dict:
    """Megatron's global memory buffer and a dense GPTModel forward at TP=1."""
    from megatron.core import parallel_state

    from alp_megatron.model.provider import ParallelConfig

    _initialize()
    model, arch = _model("LlamaForCausalLM", ParallelConfig())
    tokens, position_ids = _tokens(arch.vocab_size)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    buffer = parallel_state.get_global_memory_buffer().get_tensor((4, 3), torch.float32, "probe")
    return dict(buffer_shape=tuple(buffer.shape), buffer_device=str(buffer.device),
                logits_shape=tuple(logits.shape), finite=bool(torch.isfinite(logits).all()))


def p2_build_alltoall_moe() -> dict:
    """Building a MoE model whose layers use the alltoall token dispatcher (it creates a CUDA stream)."""
    from alp_megatron.model.provider import ParallelConfig

    _initialize()
    model, _ = _model("Qwen3MoeForCausalLM", ParallelConfig(), moe_dispatcher="alltoall")
    dispatchers = [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("TokenDispatcher")]
    return dict(dispatchers=dispatchers)


def p3_rng_tracker() -> dict:
    """``model_parallel_cuda_manual_seed`` and two forks of the model-parallel RNG state."""
    from megatron.core import tensor_parallel

    _init_parallel()
    seed = 1234
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    before = torch.rand(3)
    with tracker.fork():
        forked_1 = torch.rand(3)
    middle = torch.rand(3)
    with tracker.fork():
        forked_2 = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(5)
    default_stream = torch.rand(9)
    # Megatron seeds the model-parallel state with seed + 2718 + tp_rank (tp_rank 0 here).
    model_parallel_stream = torch.Generator().manual_seed(seed + 2718).rand(6)
    return dict(
        default=torch.cat([before, middle, after]).tolist(), expected_default=default_stream.tolist(),
        forked=torch.cat([forked_1, forked_2]).tolist(), expected_forked=model_parallel_stream.tolist(),
    )



def _train_one_step(distributed_optimizer: bool) -> dict:
    """Build a dense model, wrap it in Megatron's DDP and optimizer, and take one optimizer step."""
    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.model.provider import ParallelConfig
    from alp_megatron.trainer.engine import OptimizerSettings, build_optimizer, train_step, wrap_ddp

    _initialize()
    model, arch = _model("LlamaForCausalLM", ParallelConfig())
    settings = OptimizerSettings(lr=1e-3, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer)
    ddp_chunks = wrap_ddp([model], settings)
    optimizer, scheduler = build_optimizer(ddp_chunks, settings, PerturbationConfig())
    tokens, position_ids = _tokens(arch.vocab_size, batch=1)
    batch = dict(tokens=tokens, position_ids=position_ids, sample_ids=[0])

    def loss_function(logits, batch):
        loss_sum = logits.float().square().mean(-1).sum()
        units = torch.tensor(logits.shape[0] * logits.shape[1], dtype=torch.int)
        return loss_sum, units, {"loss_sum": loss_sum.detach(), "num_units": units}

    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(ddp_chunks, optimizer, scheduler, [batch], loss_function, 0, SEQ)
    changed = any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    return dict(optimizer=type(optimizer).__name__, inner=[type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])],
                loss=result.loss, grad_norm=result.grad_norm, applied=result.applied, changed=changed)


def p4_fp32_optimizer_step() -> dict:
    """Megatron's (non-distributed) FP32 optimizer: construction and one training step."""
    return _train_one_step(distributed_optimizer=False)


def p5_distributed_optimizer_step() -> dict:
    """Megatron's distributed optimizer: construction and one training step."""
    return _train_one_step(distributed_optimizer=True)


def _moe_forward(expert_parallel: int) -> dict:
    from alp_megatron.model.provider import ParallelConfig

    _initialize(expert_parallel=expert_parallel)
    model, arch = _model("Qwen3MoeForCausalLM", ParallelConfig(expert_parallel=expert_parallel),
                         moe_dispatcher="alltoall")
    tokens, position_ids = _tokens(arch.vocab_size)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    return dict(logits_shape=tuple(logits.shape), finite=bool(torch.isfinite(logits).all()))


def p6_moe_router_forward() -> dict:
    """A MoE model forward on one rank: the router's gating linear."""
    return _moe_forward(expert_parallel=1)


def p7_moe_alltoall_ep2() -> dict:
    """A MoE model forward with the alltoall dispatcher across 2 expert-parallel ranks."""
    return _moe_forward(expert_parallel=2)


UNEVEN_SIZES = (3, 5)


def p8_uneven_sequence_parallel_gather() -> dict:
    """``gather_from_sequence_parallel_region`` with different first-dim sizes on the 2 TP ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    _init_parallel(tensor_parallel=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    mine = piece(rank)
    gathered = gather_from_sequence_parallel_region(mine, group=group, output_split_sizes=list(UNEVEN_SIZES))
    return dict(rank=dist.get_rank(), gathered=gathered.tolist())


def piece(rank: int) -> torch.Tensor:
    """TP rank ``rank``'s part: ``UNEVEN_SIZES[rank]`` rows of 2 distinct values."""
    rows = UNEVEN_SIZES[rank]
    return torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100.0 * (rank + 1)


def probe(name, exclude=()):
    _apply(exclude)
    return globals()[name]()
