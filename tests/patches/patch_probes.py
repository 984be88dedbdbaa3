"""Rank-side code of ``test_megatron_core.py``: one small real megatron-core scenario per CPU patch.

The patches are process-global, so every entry point here runs in fresh processes spawned by
``tests.distributed.run_ranks`` and calls ``apply(exclude=...)`` before anything else can apply them
(``initialize_parallel`` calls ``apply()`` again, which is then a no-op).

- :func:`with_all_patches` (2 ranks): checks that importing the package applies nothing and that an
  unsupported megatron-core version is refused, then applies every patch and runs all scenarios,
  returning each one's facts (or its traceback).
- :func:`without_patch` (1 or 2 ranks, see ``WORLD_SIZE``): applies all patches but one and runs the
  scenario that needs the missing one; it is expected to fail with megatron-core's own error.
"""

from __future__ import annotations

import os
import traceback

import torch

SEQ = 8
SEED = 1234
UNEVEN_SIZES = (3, 5)  # first-dim sizes of the two TP ranks' pieces in the P8 scenario


def _init_parallel(tensor_parallel: int = 1) -> None:
    """gloo and Megatron's parallel state only: the RNG tracker stays unseeded (P3's scenario seeds it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)


def _initialize(expert_parallel: int = 1):
    """The project's own start-up (gloo, parallel state, seeded RNG tracker); returns the layout."""
    from alp_megatron.model.provider import ParallelConfig, initialize_parallel

    parallel = ParallelConfig(expert_parallel=expert_parallel)
    initialize_parallel(parallel, seed=SEED)
    return parallel


def _model(architecture: str, parallel, **model_settings):
    """A 2-layer tiny model of ``architecture`` (weights from SEED) and its ModelArch."""
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import ModelConfig, build_model
    from tests.tiny_models import hf_config

    arch = ModelArch.from_hf_config(hf_config(architecture, num_hidden_layers=2))
    torch.manual_seed(SEED)
    return build_model(arch, parallel, ModelConfig(**model_settings))[0], arch


def _tokens(vocab: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return tokens, position_ids


def _eval_logits(model, arch, tokens_seed: int = 0) -> torch.Tensor:
    tokens, position_ids = _tokens(arch.vocab_size, seed=tokens_seed)
    model.eval()  # the ALP perturbation is off in eval mode (no noise key needed)
    with torch.no_grad():
        return model(tokens, position_ids, None)


# ----------------------------------------------------------------------------------------------
# the scenarios, one per patch


def p1_dense_forward_and_memory_buffer() -> dict:
    """A dense GPTModel forward at TP=1 (RoPE asks for the current CUDA device) and Megatron's global
    memory buffer (allocated on ``torch.cuda.current_device()``)."""
    from megatron.core import parallel_state

    model, arch = _model("LlamaForCausalLM", _initialize())
    logits = _eval_logits(model, arch)
    buffer = parallel_state.get_global_memory_buffer().get_tensor((4, 3), torch.float32, "probe")
    return dict(logits_shape=tuple(logits.shape), finite=bool(torch.isfinite(logits).all()),
                buffer_shape=tuple(buffer.shape), buffer_device=str(buffer.device))


def p2_build_alltoall_moe() -> dict:
    """Building a MoE model whose layers use the alltoall token dispatcher (it creates a CUDA stream)."""
    model, _ = _model("Qwen3MoeForCausalLM", _initialize(), moe_dispatcher="alltoall")
    return dict(dispatchers=[type(m.token_dispatcher).__name__ for m in model.modules()
                             if hasattr(m, "token_dispatcher")])


def p3_rng_tracker_fork() -> dict:
    """``model_parallel_cuda_manual_seed`` and two forks of the model-parallel RNG state, with draws
    from the default generator before, between and after them."""
    from megatron.core import parallel_state, tensor_parallel

    _init_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    before = torch.rand(3)
    with tracker.fork():
        forked_1 = torch.rand(3)
    middle = torch.rand(3)
    with tracker.fork():
        forked_2 = torch.rand(3)
    after = torch.rand(3)
    # What the default generator alone gives from seed 5, and what Megatron's model-parallel seed
    # (seed + 2718 + tp_rank) gives: the forks must continue one stream of the latter.
    default_stream = torch.rand(9, generator=torch.Generator().manual_seed(5))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model_parallel_stream = torch.rand(6, generator=torch.Generator().manual_seed(SEED + 2718 + tp_rank))
    return dict(
        default=torch.cat([before, middle, after]).tolist(), expected_default=default_stream.tolist(),
        forked=torch.cat([forked_1, forked_2]).tolist(), expected_forked=model_parallel_stream.tolist(),
    )


def _train_one_step(distributed_optimizer: bool) -> dict:
    """Dense model in Megatron's DDP and optimizer; one optimizer step through the pipeline schedule."""
    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, train_step, wrap_ddp

    model, arch = _model("LlamaForCausalLM", _initialize())
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
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return dict(optimizers=[type(o).__name__ for o in inner], loss=result.loss, grad_norm=result.grad_norm,
                applied=result.applied, params_changed=changed, num_params=len(before))


def p4_fp32_optimizer_step() -> dict:
    """Megatron's FP32 (non-distributed) optimizer: construction and one training step."""
    return _train_one_step(distributed_optimizer=False)


def p5_distributed_optimizer_step() -> dict:
    """Megatron's distributed optimizer: construction and one training step."""
    return _train_one_step(distributed_optimizer=True)


def _moe(expert_parallel: int, dispatcher: str, tokens_seed: int = 0):
    # _initialize resets the RNG tracker, so every call builds the same weights.
    model, arch = _model("Qwen3MoeForCausalLM", _initialize(expert_parallel), moe_dispatcher=dispatcher)
    return model, _eval_logits(model, arch, tokens_seed)


def p6_moe_router_forward() -> dict:
    """A MoE model forward on one rank: the router's gating linear (``router_gating_linear``)."""
    _, logits = _moe(expert_parallel=1, dispatcher="alltoall")
    return dict(logits_shape=tuple(logits.shape), finite=bool(torch.isfinite(logits).all()))


def p7_moe_alltoall_ep2() -> dict:
    """A MoE forward with the alltoall dispatcher across 2 expert-parallel ranks, each rank with its own
    tokens. Reference: the allgather dispatcher (no alltoall split sizes) on the same weights and tokens."""
    rank = int(os.environ["RANK"])
    alltoall, logits = _moe(expert_parallel=2, dispatcher="alltoall", tokens_seed=rank)
    allgather, reference = _moe(expert_parallel=2, dispatcher="allgather", tokens_seed=rank)
    same_weights = all(torch.equal(a, b) for a, b in zip(alltoall.state_dict().values(),
                                                          allgather.state_dict().values())
                       if torch.is_tensor(a))
    return dict(logits_shape=tuple(logits.shape), finite=bool(torch.isfinite(logits).all()),
                same_weights=same_weights, max_abs_diff=float((logits - reference).abs().max()))


def tp_piece(tp_rank: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s input to the P8 gather: ``UNEVEN_SIZES[tp_rank]`` rows of distinct values."""
    rows = UNEVEN_SIZES[tp_rank]
    return torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100.0 * (tp_rank + 1)


def p8_uneven_sequence_parallel_gather() -> dict:
    """``gather_from_sequence_parallel_region`` with different first-dim sizes on the 2 TP ranks, and its
    backward (an uneven reduce-scatter) for the loss ``sum(gathered * weight_rank)``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    _init_parallel(tensor_parallel=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    mine = tp_piece(tp_rank).requires_grad_()
    gathered = gather_from_sequence_parallel_region(
        mine, group=parallel_state.get_tensor_model_parallel_group(), output_split_sizes=list(UNEVEN_SIZES)
    )
    weight = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape) * (tp_rank + 1)
    (gathered * weight).sum().backward()
    return dict(tp_rank=tp_rank, gathered=gathered.detach().tolist(), grad=mine.grad.tolist())


SCENARIOS = {
    "P1": p1_dense_forward_and_memory_buffer,
    "P2": p2_build_alltoall_moe,
    "P3": p3_rng_tracker_fork,
    "P4": p4_fp32_optimizer_step,
    "P5": p5_distributed_optimizer_step,
    "P6": p6_moe_router_forward,
    "P7": p7_moe_alltoall_ep2,
    "P8": p8_uneven_sequence_parallel_gather,
}
WORLD_SIZE = {"P7": 2, "P8": 2}  # the others run on one rank


# ----------------------------------------------------------------------------------------------
# entry points


def with_all_patches(refused_versions: list[str]) -> dict:
    """Fresh process: nothing applied on import, unsupported versions refused, then every scenario with
    every patch. Run on 2 ranks (P7 and P8 need them; the others run data-parallel on both)."""
    from packaging.version import Version

    import alp_megatron  # noqa: F401
    import alp_megatron.model.provider  # noqa: F401
    import alp_megatron.trainer.step  # noqa: F401
    from alp_megatron._patches import megatron_core

    report = dict(applied_on_import=megatron_core.applied(), refusals={})
    real_version = megatron_core.megatron_core_version
    for version in refused_versions:
        megatron_core.megatron_core_version = lambda version=version: Version(version)
        try:
            megatron_core.apply()
        except RuntimeError as error:
            report["refusals"][version] = str(error)
        else:
            report["refusals"][version] = None
        finally:
            megatron_core.megatron_core_version = real_version
    report["applied_after_refusals"] = megatron_core.applied()
    report["version"] = str(real_version())
    report["first_apply"] = megatron_core.apply()
    report["second_apply"] = megatron_core.apply()
    report["applied"] = megatron_core.applied()
    report["scenarios"] = {}
    for ident, scenario in SCENARIOS.items():
        try:
            report["scenarios"][ident] = ("ok", scenario())
        except Exception:  # noqa: BLE001 - reported per scenario; every rank runs the same code
            report["scenarios"][ident] = ("error", traceback.format_exc())
    return report


def without_patch(ident: str) -> dict:
    """Fresh process: every patch but ``ident``, then the scenario that needs it (expected to raise)."""
    from alp_megatron._patches import megatron_core

    installed = megatron_core.apply(exclude={ident})
    expected = tuple(p.ident for p in megatron_core.PATCHES
                     if p.ident != ident and p.covers(megatron_core.megatron_core_version()))
    if installed != expected:
        raise AssertionError(f"apply(exclude={{{ident!r}}}) installed {installed}, expected {expected}")
    return SCENARIOS[ident]()
