"""Rank-side code of the reference-model tests: a Policy built as a run builds it, with loss.kl_coef > 0."""

from __future__ import annotations

import torch

from alp_megatron.config import load_run_config
from alp_megatron.model.provider import initialize_parallel
from alp_megatron.trainer.policy import Policy
from tests.trainer.actor_probes import rollout_batch

OVERRIDES = ("loss.kl_coef=0.001", "model.megatron.dtype=float32", "actor.num_mini_batches=2",
             "actor.micro_batch_size=2", "alp.sigma_0=0.05")


def reference_against_actor(layout: tuple, hf_dir: str) -> dict:
    """Before any update: the actor's unperturbed logprobs and the reference model's, by the same pass the
    actor trains with; then one training step with the KL term."""
    config = load_run_config(None, (*OVERRIDES, *layout))
    initialize_parallel(config.parallel, seed=config.run.seed)
    policy = Policy.build(config, hf_dir)
    actor = policy.actor
    batch = rollout_batch(1, policy.arch.vocab_size)
    old, _ = actor.score(actor.chunks, batch)
    with actor.reference.resident() as reference:
        ref, _ = actor.score(reference, batch)
    report = actor.train(batch)
    after, _ = actor.score(actor.chunks, batch)
    with actor.reference.resident() as reference:
        ref_after, _ = actor.score(reference, batch)
    last_stage = old is not None
    return dict(
        last_stage=last_stage,
        equal=last_stage and torch.equal(old, ref),
        close=last_stage and torch.allclose(old, ref, rtol=1e-6, atol=1e-6),
        old=old.tolist() if last_stage else None,
        reference_frozen=last_stage and torch.equal(ref, ref_after),
        actor_moved=last_stage and not torch.equal(old, after),
        kl_ref_mean=report.metrics["kl_ref_mean"],
        losses=report.losses,
    )
