"""From a rollout to a training batch: rewards, group advantages, staleness, packing.

Runs on global rank 0 (the rewards read decoded text); the resulting batch is broadcast to every rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from alp_megatron.alp.advantages import grpo_advantages
from alp_megatron.rewards.base import RewardError, compute_reward
from alp_megatron.rollout.types import RolloutBatch, Sample
from alp_megatron.trainer.batch import TrainingBatch, build_training_batch

logger = logging.getLogger(__name__)


def version_number(label: str) -> int:
    """``"v12"`` -> 12: weight versions are stamped ``v<optimizer-visible policy version>``."""
    return int(label[1:]) if label.startswith("v") and label[1:].isdigit() else -1


@dataclass
class ScoredRollout:
    """Complete groups with rewards, ready to pack; ``metrics`` describe the whole rollout."""

    samples: list[Sample]
    group_size: int
    metrics: dict


def score_rollout(rollout: RolloutBatch, prompts: dict[int, Any], reward_fn, tokenizer,
                  policy_version: int) -> ScoredRollout:
    """Reward every complete group's samples; ``prompts[group_id]`` is the data ``Prompt`` of that group.

    Aborted or incomplete groups are dropped (and counted). ``policy_version`` is the version of the
    weights about to be trained: a sample's staleness is that minus the version that generated it.
    """
    groups = rollout.complete_groups()
    dropped = len(rollout.group_ids) - len(groups)
    if dropped:
        logger.warning("%d of %d prompt groups were incomplete (aborted samples) and are not trained on",
                       dropped, len(rollout.group_ids))
    samples = [s for group in groups for s in group]
    rewards, lengths, staleness, eos = [], [], [], []
    for sample in samples:
        prompt = prompts[sample.group_id]
        text = tokenizer.decode(sample.response_ids, skip_special_tokens=False)
        try:
            sample.reward = compute_reward(reward_fn, prompt.prompt_text, text, prompt.label, dict(prompt.metadata))
        except RewardError as error:  # say which dataset row: a bad label is fixed there
            raise RewardError(f"{prompt.source}, row {prompt.row}: {error}") from None
        versions = [span.version for span in sample.weight_versions] or [sample.weight_version]
        sample.metadata["staleness"] = policy_version - min(version_number(v) for v in versions)
        rewards.append(sample.reward)
        lengths.append(len(sample.response_ids))
        staleness.append(sample.metadata["staleness"])
        eos.append(sample.finish_reason == "stop")
    count = max(len(samples), 1)
    metrics = {
        "reward_mean": sum(rewards) / count,
        "reward_max": max(rewards, default=0.0),
        "response_len_mean": sum(lengths) / count,
        "response_len_max": float(max(lengths, default=0)),
        "stop_rate": sum(eos) / count,
        "staleness_mean": sum(staleness) / count,
        "staleness_max": float(max(staleness, default=0)),
        "groups_dropped": float(dropped),
        "samples": float(len(samples)),
    }
    return ScoredRollout(samples=samples, group_size=rollout.group_size, metrics=metrics)


def pack_training_batch(scored: ScoredRollout, std_normalize: bool, divisible_by: int, pad_id: int,
                        pad_to_multiple: int = 1, max_length: Optional[int] = None,
                        first_sample_id: int = 0) -> Optional[TrainingBatch]:
    """GRPO advantages per group and the padded batch; whole groups are dropped from the end until the
    sample count divides ``divisible_by`` (mini-batches x data-parallel ranks x micro-batch). None if empty."""
    n = scored.group_size
    keep = len(scored.samples)
    while keep and keep % divisible_by:
        keep -= n
    if keep < len(scored.samples):
        logger.warning("training on %d of %d samples: the count must be a multiple of %d", keep,
                       len(scored.samples), divisible_by)
    samples: Sequence[Sample] = scored.samples[:keep]
    if not samples:
        return None
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    advantages = grpo_advantages(rewards, group_size=n, std_normalize=std_normalize)
    return build_training_batch(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], [s.rollout_logprobs for s in samples],
        advantages.tolist(), list(range(first_sample_id, first_sample_id + len(samples))),
        pad_id=pad_id, pad_to_multiple=pad_to_multiple, max_length=max_length,
    )
