"""From a rollout to a training batch: rewards, group advantages, global sample ids, staleness.

Runs on global rank 0 (the rewards read decoded text), filling in each :class:`Sample` record; the batch made
from the records goes to each data-parallel rank's share (:mod:`alp_megatron.trainer.distribute`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from alp_megatron.alp.advantages import grpo_advantages
from alp_megatron.rewards.base import RewardError, compute_reward
from alp_megatron.rollout.agent import trajectory_metrics
from alp_megatron.rollout.types import RolloutBatch, Sample
from alp_megatron.sample import ROUTES, WeightSpan
from alp_megatron.trainer.batch import TrainingBatch, build_training_batch

logger = logging.getLogger(__name__)


def version_number(label: str) -> int:
    """``"v12"`` -> 12: weight versions are stamped ``v<optimizer-visible policy version>``."""
    return int(label[1:]) if label.startswith("v") and label[1:].isdigit() else -1


def oldest_version(sample: Sample) -> int:
    """The oldest weight version that produced a token of ``sample``."""
    versions = [span.version for span in sample.weight_versions] or [sample.weight_version]
    return min(version_number(v) for v in versions)


def token_staleness(sample: Sample, policy_version: int) -> dict[int, int]:
    """Staleness -> number of the sample's model tokens (loss mask 1) generated that many versions before
    ``policy_version``, from its weight-version spans (one span per version run: O(versions), not O(tokens))."""
    spans = sample.weight_versions or [WeightSpan(sample.weight_version, 0, len(sample.response_ids))]
    mask = sample.loss_mask or [1] * len(sample.response_ids)
    counts: dict[int, int] = {}
    for span in spans:
        tokens = sum(mask[span.start:span.end])
        if tokens:
            age = policy_version - version_number(span.version)
            counts[age] = counts.get(age, 0) + tokens
    return counts


def staleness_metrics(samples: list[Sample], policy_version: int) -> dict:
    """Per-token staleness (``staleness_tokens_<s>``: the share of trained model tokens ``s`` versions old,
    ``staleness_token_mean``) and ``partial_share``: the share of samples whose tokens came from two or more
    weight versions (continued across a weight update)."""
    counts: dict[int, int] = {}
    partial = 0
    for sample in samples:
        for age, tokens in token_staleness(sample, policy_version).items():
            counts[age] = counts.get(age, 0) + tokens
        partial += len({span.version for span in sample.weight_versions}) > 1
    total = sum(counts.values()) or 1
    metrics = {f"staleness_tokens_{age}": tokens / total for age, tokens in sorted(counts.items())}
    metrics["staleness_token_mean"] = sum(age * tokens for age, tokens in counts.items()) / total
    metrics["partial_share"] = partial / max(len(samples), 1)
    return metrics


@dataclass
class ScoredRollout:
    """Complete groups with rewards, ready to pack; ``metrics`` describe the whole rollout."""

    samples: list[Sample]
    group_size: int
    metrics: dict


def reward_samples(samples: list[Sample], reward_fn, tokenizer) -> None:
    """Set the reward of each sample that has none yet (dynamic sampling scored some already), from the data
    ``Prompt`` it carries; a reward that cannot be computed names the prompt's dataset row."""
    for sample in samples:
        if sample.reward is not None:
            continue
        prompt = sample.prompt
        if prompt is None:
            raise ValueError(f"sample {sample.sample_index} of group {sample.group_id} carries no data prompt; "
                             "roll out data records (Prompt), not bare token ids, to score them")
        text = tokenizer.decode(sample.response_ids, skip_special_tokens=False)
        try:
            sample.reward = compute_reward(reward_fn, prompt.prompt_text, text, prompt.label, dict(prompt.metadata))
        except RewardError as error:  # say which dataset row: a bad label is fixed there
            raise RewardError(f"{prompt.source}, row {prompt.row}: {error}") from None


def score_rollout(rollout: RolloutBatch, reward_fn, tokenizer, policy_version: int,
                  max_staleness: Optional[int] = None) -> ScoredRollout:
    """Reward every complete group's samples from the data ``Prompt`` each sample carries.

    Aborted or incomplete groups are dropped (and counted). ``policy_version`` is the version of the
    weights about to be trained: a sample's staleness is that minus the oldest version that generated a token
    of it; a group with a sample staler than ``max_staleness`` is dropped too (``stale_groups_dropped``; the
    asynchronous schedule starts no batch that could be, so this counts what got past it).
    """
    groups = rollout.complete_groups()
    dropped = len(rollout.group_ids) - len(groups)
    if dropped:
        logger.warning("%d of %d prompt groups were incomplete (aborted samples) and are not trained on",
                       dropped, len(rollout.group_ids))
    stale = 0
    if max_staleness is not None:
        fresh = [g for g in groups if all(policy_version - oldest_version(s) <= max_staleness for s in g)]
        stale, groups = len(groups) - len(fresh), fresh
        if stale:
            logger.warning("%d groups had samples more than %d versions older than the policy and are not "
                           "trained on", stale, max_staleness)
    samples = [s for group in groups for s in group]
    reward_samples(samples, reward_fn, tokenizer)
    rewards, lengths, staleness, eos = [], [], [], []
    for sample in samples:
        sample.metadata["staleness"] = policy_version - oldest_version(sample)
        rewards.append(sample.reward)
        lengths.append(len(sample.response_ids))
        staleness.append(sample.metadata["staleness"])
        eos.append(sample.finish_reason == "stop")
    count = max(len(samples), 1)
    routes = [s.extras[ROUTES] for s in samples if ROUTES in s.extras]
    metrics = {
        "reward_mean": sum(rewards) / count,
        "reward_max": max(rewards, default=0.0),
        "response_len_mean": sum(lengths) / count,
        "response_len_max": float(max(lengths, default=0)),
        "stop_rate": sum(eos) / count,
        "staleness_mean": sum(staleness) / count,
        "staleness_max": float(max(staleness, default=0)),
        "groups_dropped": float(dropped),
        "stale_groups_dropped": float(stale),
        "samples": float(len(samples)),
    }
    metrics.update(trajectory_metrics(samples))
    metrics.update(staleness_metrics(samples, policy_version))
    if routes:  # what MoE routes cost to carry, per sample
        metrics["routes_bytes_per_sample"] = sum(r.numel() * r.element_size() for r in routes) / len(routes)
    return ScoredRollout(samples=samples, group_size=rollout.group_size, metrics=metrics)


def training_batch(scored: ScoredRollout, std_normalize: bool, divisible_by: int, pad_id: int,
                   pad_to_multiple: int = 1, max_length: Optional[int] = None,
                   first_sample_id: int = 0) -> Optional[TrainingBatch]:
    """GRPO advantages per group and global ids (from ``first_sample_id``), set on the samples, and the
    samples as a :class:`TrainingBatch`; whole groups are dropped from the end until the sample count divides
    ``divisible_by`` (mini-batches x data-parallel ranks x micro-batch). None if empty. ``scored.samples``
    is cut to the samples trained on."""
    n = scored.group_size
    keep = len(scored.samples)
    while keep and keep % divisible_by:
        keep -= n
    if keep < len(scored.samples):
        logger.warning("training on %d of %d samples: the count must be a multiple of %d", keep,
                       len(scored.samples), divisible_by)
    scored.samples = scored.samples[:keep]
    if not scored.samples:
        return None
    rewards = torch.tensor([s.reward for s in scored.samples], dtype=torch.float32)
    advantages = grpo_advantages(rewards, group_size=n, std_normalize=std_normalize)
    for i, (sample, advantage) in enumerate(zip(scored.samples, advantages.tolist())):
        sample.advantage, sample.sample_id = advantage, first_sample_id + i
    return build_training_batch(scored.samples, pad_id=pad_id, pad_to_multiple=pad_to_multiple,
                                max_length=max_length)
