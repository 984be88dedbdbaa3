"""Rank-side code of the actor tests: two rollout batches of K=2 mini-batch steps under a layout."""

from __future__ import annotations

import math
from typing import Optional

import torch

from alp_megatron.alp.loss import LossConfig
from alp_megatron.model.provider import ModelConfig, ParallelConfig
from alp_megatron.trainer.actor import Actor, ActorConfig
from alp_megatron.sample import ROUTES, Sample
from alp_megatron.trainer.batch import build_training_batch
from alp_megatron.alp.perturbation import PerturbationConfig
from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, log_sigma_parameters, wrap_ddp
from tests.model.layouts import ALP, Layout, arch_for, build, load_reference

SAMPLES = 8
PROMPT = 4


def rollout_batch(seed: int, vocab: int, poison_advantages: bool = False, varied: bool = False,
                  tool_shift: Optional[float] = None, routes: Optional[tuple[int, int, int]] = None):
    """8 samples with responses of different lengths, near-uniform rollout logprobs, GRPO-like advantages
    (``varied``: the second half 3 tokens longer, so the two mini-batches' lengths differ; ``tool_shift``:
    every fourth response token (from the second) a tool's, loss mask 0, its rollout logprob moved by that;
    ``routes``: (layers, top_k, experts): random engine routes per token, as an MoE engine's)."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, logprobs = [], [], []
    for i in range(SAMPLES):
        length = 6 + (i % 4) * 2 + (3 * (i >= SAMPLES // 2) if varied else 0)
        prompts.append(torch.randint(0, vocab, (PROMPT,), generator=gen).tolist())
        responses.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
        logprobs.append((-math.log(vocab) + 0.1 * torch.randn(length, generator=gen)).tolist())
    advantages = torch.randn(SAMPLES, generator=gen).tolist()
    if poison_advantages:
        advantages[3] = float("nan")
    masks = [None] * SAMPLES
    if tool_shift is not None:
        masks = [[int(j % 4 != 1) for j in range(len(r))] for r in responses]
        logprobs = [[v + (tool_shift if j % 4 == 1 else 0.0) for j, v in enumerate(lp)] for lp in logprobs]
    extras = [{}] * SAMPLES
    if routes is not None:
        layers, top_k, experts = routes
        extras = [{ROUTES: torch.rand(PROMPT + len(r), layers, experts, generator=gen).argsort(-1)[..., :top_k]
                   .to(torch.uint8)} for r in responses]
    return build_training_batch([Sample.given(p, r, lp, a, seed * 100 + i, loss_mask=m, extras=e)
                                 for i, (p, r, lp, a, m, e)
                                 in enumerate(zip(prompts, responses, logprobs, advantages, masks, extras))])


def local_parameter_sum(chunks) -> float:
    return float(sum(p.detach().double().sum() for chunk in chunks for p in chunk.parameters()))


@torch.no_grad()
def mismatch_k3_by_hand(model, batch) -> float:
    """k3 of the batch's rollout logprobs against the single-rank ``model``'s own unperturbed logprobs,
    computed here from a plain forward: mean over response tokens of exp(d) - 1 - d, d = trainer - rollout."""
    from alp_megatron.alp.perturbation import alp_disabled

    model.eval()
    with alp_disabled(model):
        logits = model(batch.tokens, batch.position_ids, None).double()
    model.train()
    trainer = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[..., None])[..., 0]
    d = (trainer - batch.rollout_logprobs.double())[batch.loss_mask.bool()]
    return float((torch.exp(d) - 1 - d).mean())


def run_actor(parallel: ParallelConfig, reference_dir: str, method: str, poison_second: bool = False,
              epochs: int = 1, alp: PerturbationConfig = ALP, sigma: Optional[float] = None,
              max_tokens: Optional[int] = None, architecture: str = "LlamaForCausalLM",
              model: ModelConfig = ModelConfig(), distributed_optimizer: bool = False, varied: bool = False,
              tool_shift: Optional[float] = None, routes: bool = False) -> dict:
    """``alp``: the perturbation (``enabled=False`` for the baselines); ``sigma``: every layer's sigma at the
    start, instead of the reference weights' own; ``max_tokens``: packed micro-batches of that budget;
    ``varied``, ``tool_shift``: see :func:`rollout_batch`; ``routes``: random engine routes replayed (MoE)."""
    layout = Layout("actor", architecture, parallel=parallel, model=model, alp=alp)
    chunks = build(layout)
    load_reference(chunks, reference_dir)
    if sigma is not None:
        for log_sigma in log_sigma_parameters(chunks).values():
            log_sigma.data.fill_(math.log(sigma))
    settings = OptimizerSettings(lr=1e-3, clip_grad=1.0, use_distributed_optimizer=distributed_optimizer)
    ddp_chunks = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp_chunks, settings, alp)
    actor = Actor(ddp_chunks, optimizer, scheduler, LossConfig.for_method(method),
                  ActorConfig(num_mini_batches=2, epochs=epochs, micro_batch_size=2,
                              max_tokens_per_microbatch=max_tokens))
    vocab = arch_for(layout).vocab_size
    reports, sums, k3_by_hand = [], [], []
    for seed in (1, 2, 3):
        before = local_parameter_sum(chunks)
        arch = arch_for(layout)
        batch = rollout_batch(seed, vocab, poison_advantages=poison_second and seed == 2, varied=varied,
                              tool_shift=tool_shift,
                              routes=(arch.num_layers, arch.moe_topk, arch.num_experts) if routes else None)
        if len(chunks) == 1 and parallel == ParallelConfig():
            k3_by_hand.append(mismatch_k3_by_hand(chunks[0], batch))
        report = actor.train(batch)
        sums.append((before, local_parameter_sum(chunks)))
        reports.append(dict(losses=report.losses, grad_norms=report.grad_norms, applied=report.applied,
                            skip_reasons=report.skip_reasons, metrics=report.metrics))
    return dict(reports=reports, parameter_sums=sums, optimizer_steps=actor.optimizer_steps, k3_by_hand=k3_by_hand)


def actor_refusal(parallel: ParallelConfig) -> str:
    """The error an Actor gives under ``parallel`` (before it touches any model), or ''."""
    from alp_megatron.errors import ConfigError
    from alp_megatron.model.provider import initialize_parallel

    initialize_parallel(parallel)
    try:
        Actor([], None, None, LossConfig(), ActorConfig())
    except ConfigError as error:
        return str(error)
    return ""
