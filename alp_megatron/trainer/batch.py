"""Rollout samples as training tensors: right-padded tokens with next-token-aligned masks and logprobs.

Position ``t`` of a sequence predicts token ``t + 1``. A response token at absolute index ``P + j`` (``P``
prompt tokens) is therefore scored at position ``P + j - 1``: that is where its rollout logprob, its loss
mask and (after the forward) its trainer logprob live. Every rank builds the same batch from the same
samples; splitting into mini-/micro-batches and data-parallel shares happens in :mod:`trainer.actor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from alp_megatron.errors import AlpError


@dataclass
class TrainingBatch:
    """``N`` sequences, padded to ``S``. ``targets``, ``loss_mask``, ``rollout_logprobs``: ``[N, S]``
    aligned with the predicting position; ``advantages``, ``sample_ids``: ``[N]``."""

    tokens: torch.Tensor  # [N, S] int64
    targets: torch.Tensor  # [N, S] int64, tokens shifted left (pad at the end)
    position_ids: torch.Tensor  # [N, S]
    loss_mask: torch.Tensor  # [N, S] float32, 1 where the target is a response token
    rollout_logprobs: torch.Tensor  # [N, S] float32, the engine's logprob of the target (0 elsewhere)
    advantages: torch.Tensor  # [N] float32
    sample_ids: torch.Tensor  # [N] int64, global ids keying the ALP noise
    old_logprobs: Optional[torch.Tensor] = None  # [N, S], the trainer's unperturbed logprobs, once computed
    ref_logprobs: Optional[torch.Tensor] = None  # [N, S], the KL reference model's logprobs, once computed

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def select(self, index: slice) -> "TrainingBatch":
        """The sequences ``index`` (a slice) of every field."""
        return TrainingBatch(**{
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)
        })

    def as_micro_batch(self) -> dict:
        """The dict a Megatron forward step and the loss function read."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def build_training_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    rollout_logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    sample_ids: Sequence[int],
    pad_id: int = 0,
    pad_to_multiple: int = 1,
    max_length: Optional[int] = None,
) -> TrainingBatch:
    """Pack ``N`` samples (prompt + response) into a :class:`TrainingBatch`.

    Sequences are right-padded with ``pad_id`` to the longest one, rounded up to ``pad_to_multiple`` (the
    tensor-parallel size under sequence parallelism, for example). ``rollout_logprobs[i]`` has one entry per
    response token. A sample longer than ``max_length`` or with mismatched lengths is an error naming it.
    """
    count = len(prompt_ids)
    for name, values in (("response_ids", response_ids), ("rollout_logprobs", rollout_logprobs),
                         ("advantages", advantages), ("sample_ids", sample_ids)):
        if len(values) != count:
            raise AlpError(f"training batch: {count} prompts but {len(values)} {name}; one per sample is required")
    lengths = []
    for i, (prompt, response, logprobs) in enumerate(zip(prompt_ids, response_ids, rollout_logprobs)):
        if len(prompt) == 0:
            raise AlpError(f"training batch: sample {i} (id {sample_ids[i]}) has an empty prompt")
        if len(logprobs) != len(response):
            raise AlpError(
                f"training batch: sample {i} (id {sample_ids[i]}) has {len(response)} response tokens but "
                f"{len(logprobs)} rollout logprobs; the engine must return one logprob per generated token"
            )
        bad = [j for j, value in enumerate(logprobs) if not math.isfinite(value)]
        if bad:
            raise AlpError(
                f"training batch: sample {i} (id {sample_ids[i]}) has non-finite rollout logprobs at response "
                f"positions {bad[:5]}"
            )
        lengths.append(len(prompt) + len(response))
    longest = max(lengths)
    if max_length is not None and longest > max_length:
        worst = lengths.index(longest)
        raise AlpError(
            f"training batch: sample {worst} (id {sample_ids[worst]}) has {longest} tokens, more than the "
            f"model's {max_length}; lower rollout.max_new_tokens or the prompt length"
        )
    seq_length = -(-longest // pad_to_multiple) * pad_to_multiple

    tokens = torch.full((count, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((count, seq_length), dtype=torch.float32)
    aligned_logprobs = torch.zeros((count, seq_length), dtype=torch.float32)
    for i, (prompt, response, logprobs) in enumerate(zip(prompt_ids, response_ids, rollout_logprobs)):
        start, end = len(prompt), len(prompt) + len(response)
        tokens[i, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        loss_mask[i, start - 1 : end - 1] = 1.0
        aligned_logprobs[i, start - 1 : end - 1] = torch.tensor(list(logprobs), dtype=torch.float32)
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return TrainingBatch(
        tokens=tokens,
        targets=targets,
        position_ids=torch.arange(seq_length).expand(count, -1).contiguous(),
        loss_mask=loss_mask,
        rollout_logprobs=aligned_logprobs,
        advantages=torch.as_tensor(list(advantages), dtype=torch.float32),
        sample_ids=torch.as_tensor(list(sample_ids), dtype=torch.long),
    )
