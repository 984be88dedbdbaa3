"""Rank-side code of the P9 test: save and load a checkpoint whose optimizer has the log_sigma group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def save_and_load_with_sigma_group(directory: str, with_fix: bool) -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from alp_megatron._patches import megatron_core
    from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model
    from alp_megatron.trainer.checkpoint import load_checkpoint, save_checkpoint
    from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, wrap_ddp
    from tests.model.layouts import ALP, Layout, arch_for

    dist.init_process_group("gloo")
    megatron_core.apply()
    if with_fix:
        megatron_core.apply_fixes()
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    chunks = build_model(arch_for(Layout("p9")), ParallelConfig(), ModelConfig(), ALP)
    settings = OptimizerSettings(lr=1e-3)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, ALP)
    groups = [(len(g["params"]), g["max_lr"]) for g in optimizer.param_groups]
    for chunk in chunks:  # one step, so the optimizer has state to save
        for p in chunk.parameters():
            p.main_grad = torch.ones_like(p)
    optimizer.step()
    save_checkpoint(directory, 1, ddp, optimizer, scheduler, {})
    load_checkpoint(directory + "/step_00000001", ddp, optimizer, scheduler)
    return dict(groups=groups, fixes=megatron_core.fixes_applied())
