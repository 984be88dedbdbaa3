"""Rank-side code of the checkpoint tests: train, save, resume, train again."""

from __future__ import annotations

from alp_megatron.alp.loss import LossConfig
from alp_megatron.model.provider import ParallelConfig
from alp_megatron.trainer.actor import Actor, ActorConfig
from alp_megatron.trainer.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from alp_megatron.trainer.engine import OptimizerSettings, build_optimizer, log_sigma_parameters, wrap_ddp
from tests.model.layouts import ALP, Layout, arch_for, build, load_reference
from tests.trainer.actor_probes import rollout_batch

SETTINGS = OptimizerSettings(lr=1e-3, clip_grad=1.0, lr_warmup_steps=3)


def _actor(parallel: ParallelConfig, reference_dir: str):
    layout = Layout("checkpoint", parallel=parallel)
    chunks = build(layout)
    load_reference(chunks, reference_dir)
    ddp_chunks = wrap_ddp(chunks, SETTINGS)
    optimizer, scheduler = build_optimizer(ddp_chunks, SETTINGS, ALP)
    actor = Actor(ddp_chunks, optimizer, scheduler, LossConfig(), ActorConfig(num_mini_batches=2, micro_batch_size=2))
    return actor, chunks, arch_for(layout).vocab_size


def train_then_save(parallel: ParallelConfig, reference_dir: str, directory: str) -> dict:
    """Train batch 1, save, train batches 2 and 3: the uninterrupted run."""
    actor, chunks, vocab = _actor(parallel, reference_dir)
    actor.train(rollout_batch(1, vocab))
    save_checkpoint(directory, 1, actor.chunks, actor.optimizer, actor.scheduler,
                    {"data_position": {"epoch": 0, "index": 8}, "weight_version": 1,
                     "optimizer_steps": actor.optimizer_steps})
    losses = [actor.train(rollout_batch(seed, vocab)).losses for seed in (2, 3)]
    return dict(losses=losses, lr=actor.optimizer.param_groups[0]["lr"],
                log_sigma={i: float(p) for i, p in log_sigma_parameters(chunks).items()})


def resume(parallel: ParallelConfig, reference_dir: str, directory: str) -> dict:
    actor, chunks, vocab = _actor(parallel, reference_dir)
    for seed in (7, 8):  # move the fresh model away from the saved one first: the load must overwrite it
        actor.train(rollout_batch(seed, vocab))
    path = find_latest_checkpoint(directory)
    state = load_checkpoint(path, actor.chunks, actor.optimizer, actor.scheduler)
    actor.optimizer_steps = state["optimizer_steps"]
    losses = [actor.train(rollout_batch(seed, vocab)).losses for seed in (2, 3)]
    return dict(path=path, state=state, losses=losses, lr=actor.optimizer.param_groups[0]["lr"],
                log_sigma={i: float(p) for i, p in log_sigma_parameters(chunks).items()})


def save_then_load_a_layer_range(parallel: ParallelConfig, reference_dir: str, directory: str) -> dict:
    """ALP on layers [1, 3) of 4 only: train a step, save, load into a fresh model, compare log_sigma."""
    import dataclasses

    alp = dataclasses.replace(ALP, perturb_start=1, perturb_end=3)
    layout = Layout("layer_range", parallel=parallel, alp=alp)

    def make():
        chunks = build(layout)
        load_reference(chunks, reference_dir)
        ddp_chunks = wrap_ddp(chunks, SETTINGS)
        optimizer, scheduler = build_optimizer(ddp_chunks, SETTINGS, alp)
        return chunks, Actor(ddp_chunks, optimizer, scheduler, LossConfig(),
                             ActorConfig(num_mini_batches=2, micro_batch_size=2))

    chunks, actor = make()
    actor.train(rollout_batch(1, arch_for(layout).vocab_size))
    trained = {i: float(p) for i, p in log_sigma_parameters(chunks).items()}
    save_checkpoint(directory, 1, actor.chunks, actor.optimizer, actor.scheduler,
                    {"weight_version": 1, "optimizer_steps": actor.optimizer_steps})
    fresh_chunks, fresh = make()
    load_checkpoint(find_latest_checkpoint(directory), fresh.chunks, fresh.optimizer, fresh.scheduler)
    return dict(trained=trained, loaded={i: float(p) for i, p in log_sigma_parameters(fresh_chunks).items()})
