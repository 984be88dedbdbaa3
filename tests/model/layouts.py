"""Rank-side code of the layout-equivalence tests: train 3 ALP steps under a parallel layout.

Every layout loads the same reference weights (a Megatron dist-checkpoint written by the single-rank
reference run, resharded by Megatron on load), sees the same global batch, and reports the loss and
gradient norm per step and every log_sigma value and gradient after the last step.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.distributed as dist

from alp_megatron.alp.loss import LossConfig, policy_loss
from alp_megatron.alp.perturbation import PerturbationConfig
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.logprobs import shift_targets, token_logprobs
from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
from alp_megatron.trainer.step import (
    OptimizerSettings, build_optimizer, log_sigma_parameters, train_step, wrap_ddp,
)
from tests.tiny_models import hf_config

GLOBAL_BATCH = 4
MICRO_BATCH = 1
SEQ = 16
PROMPT = 4
STEPS = 3
ALP = PerturbationConfig(sigma_0=0.1, sigma_lr=0.05, seed=7)
OPTIM = OptimizerSettings(lr=1e-3, clip_grad=1.0)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    architecture: str = "LlamaForCausalLM"
    parallel: ParallelConfig = ParallelConfig()
    model: ModelConfig = ModelConfig()
    distributed_optimizer: bool = False
    loss_method: str = "alp_seq"
    alp: PerturbationConfig = ALP

    @property
    def reference(self) -> str:
        """Which reference weights the layout loads (a logits-perturbed model has one more log_sigma)."""
        return f"{self.architecture}/{self.alp.target}"


def arch_for(layout: Layout) -> ModelArch:
    tie = layout.architecture == "LlamaForCausalLM"
    return ModelArch.from_hf_config(hf_config(layout.architecture, tie_word_embeddings=tie))


def global_batch(vocab: int) -> list[dict]:
    """The same samples for every layout: tokens, a response mask, rollout logprobs near uniform, advantages."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    loss_mask[:, PROMPT - 1 : SEQ - 1] = 1.0
    loss_mask[1, SEQ - 4 :] = 0.0  # a shorter response
    rollout_logprobs = -math.log(vocab) + 0.05 * torch.randn(GLOBAL_BATCH, SEQ, generator=gen)
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2])[:GLOBAL_BATCH]
    samples = []
    for i in range(GLOBAL_BATCH):
        samples.append(dict(
            tokens=tokens[i], targets=shift_targets(tokens[i : i + 1])[0], loss_mask=loss_mask[i],
            rollout_logprobs=rollout_logprobs[i], advantages=advantages[i], sample_id=i,
        ))
    return samples


def micro_batches(samples: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    per_rank = len(samples) // dp_size
    mine = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    batches = []
    for start in range(0, len(mine), MICRO_BATCH):
        group = mine[start : start + MICRO_BATCH]
        stack = lambda key: torch.stack([s[key] for s in group])  # noqa: E731
        batches.append(dict(
            tokens=stack("tokens"), targets=stack("targets"), loss_mask=stack("loss_mask"),
            rollout_logprobs=stack("rollout_logprobs"), advantages=stack("advantages"),
            sample_ids=[s["sample_id"] for s in group],
            position_ids=torch.arange(SEQ).unsqueeze(0).expand(len(group), -1),
        ))
    return batches


def make_loss_function(method: str):
    cfg = LossConfig(method=method)

    def loss_function(logits, batch):
        logprobs = token_logprobs(logits, batch["targets"])
        loss, _ = policy_loss(logprobs, batch["rollout_logprobs"], batch["advantages"], batch["loss_mask"], cfg)
        units = batch["loss_mask"].sum()
        loss_sum = loss * units
        return loss_sum, units.to(torch.int), {"loss_sum": loss_sum.detach(), "num_units": units}

    return loss_function


def build(layout: Layout):
    initialize_parallel(layout.parallel, seed=1234)
    torch.manual_seed(1234)
    return build_model(arch_for(layout), layout.parallel, layout.model, layout.alp)


def save_reference(layout: Layout, directory: str) -> None:
    """Write the reference weights (single rank) that every layout loads."""
    from megatron.core import dist_checkpointing

    chunks = build(layout)
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(chunks[0].sharded_state_dict(), directory)


def load_reference(chunks: list, directory: str) -> None:
    from megatron.core import dist_checkpointing

    # All chunks in one load: with virtual stages each chunk covers only part of every tensor's layers.
    sharded = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, directory)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"])


def materialize_full_grads(ddp_chunks: list) -> None:
    """Under the distributed optimizer each rank holds only its shard of reduced grads: gather them."""
    for chunk in ddp_chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            group = buffer.data_parallel_group
            size = dist.get_world_size(group)
            if size == 1:
                continue
            for bucket in buffer.buckets:
                shard = bucket.grad_data.view(size, -1)[dist.get_rank(group)].clone()
                dist.all_gather_into_tensor(bucket.grad_data, shard, group=group)


def train(layout: Layout, reference_dir: str) -> dict:
    from megatron.core import parallel_state

    chunks = build(layout)
    load_reference(chunks, reference_dir)
    settings = dataclasses.replace(OPTIM, use_distributed_optimizer=layout.distributed_optimizer)
    ddp_chunks = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp_chunks, settings, layout.alp)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = micro_batches(global_batch(arch_for(layout).vocab_size), dp_rank, dp_size)
    loss_function = make_loss_function(layout.loss_method)
    losses, grad_norms = [], []
    for step in range(STEPS):
        result = train_step(ddp_chunks, optimizer, scheduler, batches, loss_function, step, SEQ)
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
    if layout.distributed_optimizer:
        materialize_full_grads(ddp_chunks)
    params = log_sigma_parameters(chunks)
    return dict(
        losses=losses,
        grad_norms=grad_norms,
        log_sigma={i: float(p.detach()) for i, p in params.items()},
        log_sigma_grad={i: float(p.main_grad) for i, p in params.items()},
    )


def run_layouts(layouts: list[Layout], reference_dirs: dict) -> list[dict]:
    """Rank entry point: train each layout in turn in this process group."""
    results = []
    for layout in layouts:
        results.append(train(layout, reference_dirs[layout.reference]))
    return results


def run_reference(layouts: list[Layout], reference_dirs: dict) -> list[dict]:
    """Single-rank entry point: write each architecture's reference weights, then train the layouts."""
    for layout in layouts:
        if layout.reference in reference_dirs and not _written(reference_dirs[layout.reference]):
            save_reference(layout, reference_dirs[layout.reference])
    return run_layouts(layouts, reference_dirs)


def _written(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "metadata.json"))
