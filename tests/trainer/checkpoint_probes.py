"""Rank-side code of the checkpoint tests: train, save, resume through the code a resumed run uses, train again."""

from __future__ import annotations

from alp_megatron.alp.loss import LossConfig
from alp_megatron.data.batches import PromptBatches
from alp_megatron.data.prompts import Prompt
from alp_megatron.model.provider import ModelConfig, ParallelConfig
from alp_megatron.trainer.actor import Actor, ActorConfig
from alp_megatron.trainer.checkpoint import RunProgress, find_latest_checkpoint, load_checkpoint, save_checkpoint
from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, log_sigma_parameters, wrap_ddp
from tests.model.layouts import ALP, Layout, arch_for, build, load_reference
from tests.trainer.actor_probes import rollout_batch

SETTINGS = OptimizerSettings(lr=1e-3, clip_grad=1.0, lr_warmup_steps=3)
# Dropout on: the resumed run sees the same masks only if the checkpoint's RNG states are restored.
DROPOUT = ModelConfig(extra={"hidden_dropout": 0.1, "attention_dropout": 0.1})
PROMPTS = [Prompt(prompt_ids=(i,), prompt_text=str(i), label=None, metadata={}, index=i, source="probe", row=i + 1)
           for i in range(16)]


def _actor(parallel: ParallelConfig, reference_dir: str, model: ModelConfig):
    layout = Layout("checkpoint", parallel=parallel, model=model)
    chunks = build(layout)
    load_reference(chunks, reference_dir)
    ddp_chunks = wrap_ddp(chunks, SETTINGS)
    optimizer, scheduler = build_optimizer(ddp_chunks, SETTINGS, ALP)
    actor = Actor(ddp_chunks, optimizer, scheduler, LossConfig(), ActorConfig(num_mini_batches=2, micro_batch_size=2))
    return actor, chunks, arch_for(layout).vocab_size


def _train_on_next_prompts(actor, prompts: PromptBatches, vocab: int) -> list:
    """One step on the next prompts of the stream: which prompts they are decides the batch."""
    drawn = prompts.next_batch()
    return actor.train(rollout_batch(1 + sum((i + 1) * p.index for i, p in enumerate(drawn)), vocab)).losses


def train_then_save(parallel: ParallelConfig, reference_dir: str, directory: str, model: ModelConfig) -> dict:
    """Train step 0, save as the loop does, train steps 1 and 2: the uninterrupted run."""
    actor, chunks, vocab = _actor(parallel, reference_dir, model)
    prompts = PromptBatches(PROMPTS, batch_size=2, seed=0)
    _train_on_next_prompts(actor, prompts, vocab)
    progress = RunProgress.after_step(0, 1, actor, {"data_position": prompts.position.to_dict(), "next_group_id": 2})
    save_checkpoint(directory, 1, actor.chunks, actor.optimizer, actor.scheduler, progress.to_state())
    losses = [_train_on_next_prompts(actor, prompts, vocab) for _ in range(2)]
    return dict(losses=losses, lr=actor.optimizer.param_groups[0]["lr"], progress=progress.to_state(),
                log_sigma={i: float(p) for i, p in log_sigma_parameters(chunks).items()})


def resume(parallel: ParallelConfig, reference_dir: str, directory: str, model: ModelConfig) -> dict:
    """A fresh run trains two other steps first (moving weights, Adam state, the optimizer-step count, the RNG
    and the prompt stream away from the saved ones), then resumes as a resumed run does and trains on."""
    actor, chunks, vocab = _actor(parallel, reference_dir, model)
    prompts = PromptBatches(PROMPTS, batch_size=2, seed=0)
    for _ in range(2):
        _train_on_next_prompts(actor, prompts, vocab)
    prompts = PromptBatches(PROMPTS, batch_size=2, seed=0)  # as a restarted run builds it: at the start
    path = find_latest_checkpoint(directory)
    progress = RunProgress.from_state(load_checkpoint(path, actor.chunks, actor.optimizer, actor.scheduler))
    progress.restore(actor, prompts)
    losses = [_train_on_next_prompts(actor, prompts, vocab) for _ in range(2)]
    return dict(path=path, progress=progress.to_state(), losses=losses, lr=actor.optimizer.param_groups[0]["lr"],
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
