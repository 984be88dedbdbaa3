"""Megatron training machinery for the ALP model: DDP, the optimizer (with the sigma group), one step.

Megatron's own DDP, ``finalize_model_grads``, optimizer and pipeline schedules do the distributed work
(SP/TP reductions of ``.sequence_parallel`` grads, tied embeddings across stages, expert vs dense data-
parallel groups, the distributed optimizer). This module only wires them and keys the ALP noise.
All ranks call every function here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from alp_megatron.alp.perturbation import PerturbationConfig, perturbation_modules, set_microbatch
from alp_megatron.errors import ConfigError
from alp_megatron.model import packing, routing


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam for the model weights; ``log_sigma`` gets its own group (``alp.sigma_lr``/``sigma_weight_decay``)."""

    lr: float = 1e-6
    min_lr: Optional[float] = None  # None: equal to lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    lr_decay_steps: int = 1_000_000
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("optimizer.lr", f"must be a positive number, got {self.lr!r}", "use e.g. 1e-6")
        if self.clip_grad < 0:
            raise ConfigError("optimizer.clip_grad", f"must be >= 0, got {self.clip_grad}", "use 1.0, or 0 to disable")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError("optimizer.lr_decay_style", f"{self.lr_decay_style!r} is not supported",
                              "use constant, linear or cosine")


def wrap_ddp(chunks: list, settings: OptimizerSettings) -> list:
    """Wrap each model chunk in Megatron's DDP (fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=index > 0)
        )
    return wrapped


def build_optimizer(ddp_chunks: list, settings: OptimizerSettings, alp: PerturbationConfig):
    """Megatron's optimizer and LR scheduler; ``log_sigma`` parameters form their own group."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    try:
        from megatron.core.optimizer import get_standard_config_overrides
    except ImportError:  # location differs across releases
        from megatron.core.optimizer.__init__ import get_standard_config_overrides

    config = ddp_chunks[0].config
    bf16 = config.bf16
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr if settings.min_lr is None else settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    overrides = dict(get_standard_config_overrides(opt_config))
    overrides[ParamKey(attr="is_alp_log_sigma")] = {
        "max_lr": alp.sigma_lr,
        "min_lr": alp.sigma_lr,
        "start_wd": alp.sigma_weight_decay,
        "end_wd": alp.sigma_weight_decay,
        "wd_mult": 1.0,
        "alp_sigma_group": True,
    }
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.lr_warmup_steps else opt_config.lr,
        max_lr=opt_config.lr,
        min_lr=opt_config.min_lr,
        lr_warmup_steps=settings.lr_warmup_steps,
        lr_decay_steps=max(settings.lr_decay_steps, settings.lr_warmup_steps + 1),
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    for chunk in ddp_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        if settings.overlap_grad_reduce:
            chunk.config.no_sync_func = [c.no_sync for c in ddp_chunks]
            if len(ddp_chunks) == 1:
                chunk.config.no_sync_func = ddp_chunks[0].no_sync
    return optimizer, scheduler


@dataclass
class StepResult:
    loss: float  # the global per-unit (token or sequence) mean of the loss
    grad_norm: float
    applied: bool
    reports: list  # per micro-batch dicts from the loss function (last pipeline stage only)
    skip_reason: Optional[str] = None  # why the update was not applied (non-finite loss or gradient)


LossFunction = Callable[[torch.Tensor, dict], tuple]
"""``(output_logits [b, s, v/tp], micro_batch) -> (loss_sum, num_units, report_dict)``."""


def train_step(
    ddp_chunks: list,
    optimizer,
    scheduler,
    micro_batches: list[dict],
    loss_function: LossFunction,
    step: int,
    seq_length: int,
) -> StepResult:
    """One optimizer step over this data-parallel rank's ``micro_batches`` (gradient accumulation).

    Each micro-batch dict holds ``tokens`` and ``position_ids`` ``[b, s]`` and ``sample_ids`` ``[b]`` (global
    ids keying the ALP noise), or a packed row (``[1, T]``, with ``lengths``; see
    :func:`alp_megatron.trainer.batch.packed_micro_batch`), plus whatever ``loss_function`` reads. The step is
    skipped, not applied, when the loss or gradient norm is not finite.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        set_microbatch(model, step, batch["sample_ids"], batch["lengths"] if packing.is_packed(batch) else None)
        output = packing.forward(model, batch)
        return output, lambda logits: loss_function(logits, batch)

    vp_size = len(ddp_chunks)
    iterators = [iter(micro_batches) for _ in range(vp_size)] if vp_size > 1 else iter(micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=ddp_chunks if vp_size > 1 else ddp_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    routing.clear(ddp_chunks)
    loss = _global_mean_loss(reports)
    applied, grad_norm, skip_reason = guarded_optimizer_step(optimizer, loss)
    if applied:
        scheduler.step(increment=1)
    else:
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    return StepResult(loss=loss, grad_norm=grad_norm, applied=applied, reports=reports, skip_reason=skip_reason)


@torch.no_grad()
def guarded_optimizer_step(optimizer, loss: float) -> tuple[bool, float, Optional[str]]:
    """Clip and apply the accumulated gradients unless the loss or the gradient norm is not finite.

    Megatron's own ``step()`` only detects inf/NaN when a loss scaler is in use (fp16); with fp32 or
    bf16 it would apply a NaN update. This does Megatron's steps one by one (prepare, norm, clip, apply)
    and stops before applying anything that is not finite. ``loss`` must be the same on every rank (the
    global mean); the norm is reduced by Megatron, so every rank takes the same decision.
    Returns ``(applied, grad_norm, skip_reason)``.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return False, float("nan"), "the loss scaler found inf/NaN gradients"
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(loss):
        return False, grad_norm, f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return False, grad_norm, f"gradient norm is {grad_norm}"
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        parameters = sub.get_parameters()
        if sub.config.clip_grad > 0.0 and parameters and not getattr(sub, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(
                parameters,
                max_norm=sub.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=getattr(sub.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False),
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm, None


def _global_mean_loss(reports: list) -> float:
    """Sum of loss over units / units, across micro-batches and data-parallel ranks (last stage's value)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    totals = torch.zeros(2, dtype=torch.float64)
    for report in reports or []:
        totals += torch.tensor([float(report["loss_sum"]), float(report["num_units"])], dtype=torch.float64)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # Only the last pipeline stage computes the loss; share it with the other stages.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def log_sigma_parameters(chunks: Iterable[torch.nn.Module]) -> dict[int, torch.nn.Parameter]:
    """``{global layer index: log_sigma}`` of the layers this rank holds."""
    return {m.layer_index: m.log_sigma for chunk in chunks for m in perturbation_modules(chunk)}
