"""Rollout samples as training tensors: right-padded tokens with next-token-aligned masks and logprobs.

Position ``t`` of a sequence predicts token ``t + 1``. A response token at absolute index ``P + j`` (``P``
prompt tokens) is therefore scored at position ``P + j - 1``: that is where its rollout logprob, its loss
mask and (after the forward) its trainer logprob live. :func:`build_training_batch` is the one place
:class:`~alp_megatron.sample.Sample` records become tensors (on global rank 0); which samples each
data-parallel rank trains on is :func:`share_indices`, and this module makes the micro-batches from its
share: rows of the padded batch, or samples packed by a token budget (:func:`plan_micro_batches`,
:func:`packed_micro_batch`). Nothing else reshapes a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch

from alp_megatron.errors import AlpError
from alp_megatron.sample import EXTRA_PREFIX, Sample


@dataclass
class TrainingBatch:
    """``N`` sequences, padded to ``S``. ``targets``, ``loss_mask``, ``rollout_logprobs``: ``[N, S]``
    aligned with the predicting position; ``advantages``, ``sample_ids``: ``[N]``; ``extras``: per-token
    extras ``[N, S, ...]`` aligned with ``tokens`` (zero past a sample's end)."""

    tokens: torch.Tensor  # [N, S] int64
    targets: torch.Tensor  # [N, S] int64, tokens shifted left (pad at the end)
    position_ids: torch.Tensor  # [N, S]
    loss_mask: torch.Tensor  # [N, S] float32, 1 where the target is a token the policy produced
    rollout_logprobs: torch.Tensor  # [N, S] float32, the engine's logprob of the target (0 elsewhere)
    advantages: torch.Tensor  # [N] float32
    sample_ids: torch.Tensor  # [N] int64, global ids keying the ALP noise
    lengths: torch.Tensor  # [N] int64, prompt + response tokens (the rest of the row is padding)
    old_logprobs: Optional[torch.Tensor] = None  # [N, S], the trainer's unperturbed logprobs, once computed
    ref_logprobs: Optional[torch.Tensor] = None  # [N, S], the KL reference model's logprobs, once computed
    extras: dict = field(default_factory=dict)  # name -> [N, S, ...]

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def select(self, index) -> "TrainingBatch":
        """The sequences ``index`` (a slice or an index tensor) of every field."""
        return TrainingBatch(**{
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in _TENSOR_FIELDS
        }, extras={name: value[index] for name, value in self.extras.items()})

    def as_micro_batch(self) -> dict:
        """The dict a Megatron forward step and the loss function read."""
        micro = {f.name: getattr(self, f.name) for f in _TENSOR_FIELDS if getattr(self, f.name) is not None}
        micro.update({EXTRA_PREFIX + name: value for name, value in self.extras.items()})
        return micro


_TENSOR_FIELDS = tuple(f for f in fields(TrainingBatch) if f.name != "extras")


def build_training_batch(samples: Sequence[Sample], pad_id: int = 0, pad_to_multiple: int = 1,
                         max_length: Optional[int] = None) -> TrainingBatch:
    """The one place :class:`~alp_megatron.rollout.types.Sample` records become tensors: ``N`` scored samples
    (prompt + response, ``advantage`` and ``sample_id`` set) as a :class:`TrainingBatch`.

    Sequences are right-padded with ``pad_id`` to the longest one, rounded up to ``pad_to_multiple`` (the
    tensor-parallel size under sequence parallelism, for example). A response token's loss mask and rollout
    logprob sit at the position that predicts it; a sample's ``extras`` (one row per token) are stacked per
    name. A sample longer than ``max_length``, or whose per-token fields disagree in length, is an error
    naming it; nothing is truncated.
    """
    count = len(samples)
    if not count:
        raise AlpError("training batch: no samples")
    lengths = [_check_sample(i, sample) for i, sample in enumerate(samples)]
    longest = max(lengths)
    if max_length is not None and longest > max_length:
        worst = lengths.index(longest)
        raise AlpError(
            f"training batch: sample {worst} (id {samples[worst].sample_id}) has {longest} tokens, more than the "
            f"model's {max_length}; lower rollout.max_new_tokens or the prompt length"
        )
    seq_length = -(-longest // pad_to_multiple) * pad_to_multiple

    tokens = torch.full((count, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((count, seq_length), dtype=torch.float32)
    aligned_logprobs = torch.zeros((count, seq_length), dtype=torch.float32)
    extras = {name: torch.zeros((count, seq_length, *value.shape[1:]), dtype=value.dtype)
              for name, value in _extras_of(samples[0]).items()}
    for i, sample in enumerate(samples):
        start, end = len(sample.prompt_ids), sample.length
        tokens[i, :end] = torch.tensor(list(sample.prompt_ids) + list(sample.response_ids), dtype=torch.long)
        loss_mask[i, start - 1 : end - 1] = torch.tensor(list(sample.loss_mask), dtype=torch.float32)
        aligned_logprobs[i, start - 1 : end - 1] = torch.tensor(list(sample.rollout_logprobs), dtype=torch.float32)
        mine = _extras_of(sample)
        if mine.keys() != extras.keys():
            raise AlpError(f"training batch: sample {i} (id {sample.sample_id}) has extras {sorted(mine)}, sample 0 "
                           f"has {sorted(extras)}; every sample of a batch carries the same per-token extras")
        for name, value in mine.items():
            if value.shape[1:] != extras[name].shape[2:] or value.dtype != extras[name].dtype:
                raise AlpError(f"training batch: sample {i} (id {sample.sample_id}) has extra {name!r} of "
                               f"{value.dtype} {tuple(value.shape)}, sample 0 of {extras[name].dtype} "
                               f"[*, {', '.join(map(str, extras[name].shape[2:]))}]")
            extras[name][i, :end] = value
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return TrainingBatch(
        tokens=tokens,
        targets=targets,
        position_ids=torch.arange(seq_length).expand(count, -1).contiguous(),
        loss_mask=loss_mask,
        rollout_logprobs=aligned_logprobs,
        advantages=torch.tensor([_required(i, s, "advantage") for i, s in enumerate(samples)], dtype=torch.float32),
        sample_ids=torch.tensor([_required(i, s, "sample_id") for i, s in enumerate(samples)], dtype=torch.long),
        lengths=torch.as_tensor(lengths, dtype=torch.long),
        extras=extras,
    )


def _check_sample(i: int, sample: Sample) -> int:
    """Sample ``i``'s length, once its per-token fields are consistent; an error naming it otherwise."""
    name = f"training batch: sample {i} (id {sample.sample_id})"
    if len(sample.prompt_ids) == 0:
        raise AlpError(f"{name} has an empty prompt")
    response = len(sample.response_ids)
    if len(sample.rollout_logprobs) != response:
        raise AlpError(f"{name} has {response} response tokens but {len(sample.rollout_logprobs)} rollout "
                       "logprobs; the engine must return one logprob per generated token")
    if len(sample.loss_mask) != response or any(m not in (0, 1) for m in sample.loss_mask):
        raise AlpError(f"{name} has a loss mask of {len(sample.loss_mask)} values for {response} response tokens; "
                       "it must hold one 0 or 1 per response token (1 where the policy produced it)")
    bad = [j for j, value in enumerate(sample.rollout_logprobs) if not math.isfinite(value)]
    if bad:
        raise AlpError(f"{name} has non-finite rollout logprobs at response positions {bad[:5]}")
    for extra, value in _extras_of(sample).items():
        if value.dim() == 0 or value.shape[0] != sample.length:
            raise AlpError(f"{name} has extra {extra!r} of shape {tuple(value.shape)}; it needs one row per token "
                           f"of prompt and response ({sample.length})")
    return sample.length


def _extras_of(sample: Sample) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value) for name, value in sample.extras.items()}


def _required(i: int, sample: Sample, field_name: str):
    value = getattr(sample, field_name)
    if value is None:
        raise AlpError(f"training batch: sample {i} has no {field_name}; score the rollout first "
                       "(alp_megatron.run.scoring.training_batch sets it)")
    return value


# -- packed micro-batches ------------------------------------------------------------------------------------

LOSS_FIELDS = ("loss_mask", "rollout_logprobs", "old_logprobs", "ref_logprobs")
"""``[n, S]`` fields a packed micro-batch keeps per sample (cut to its longest sample) for the loss."""


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, count: int = 1,
                       sample_ids: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Which samples (indices into ``lengths``) each packed micro-batch holds, at most ``max_tokens`` tokens
    per micro-batch and at least ``count`` micro-batches.

    First-fit decreasing (longest sample first, ties by index), so the same lengths give the same plan on
    every rank; then, while fewer than ``count``, the micro-batch with the most tokens is split in two
    (ranks that must run the same number of forwards, as expert parallelism's all-to-alls need, pass the
    largest count any of them plans). Each micro-batch lists its samples in index order, and micro-batches
    are ordered by their first sample. Raises naming the sample when one alone exceeds ``max_tokens``.
    """
    for i, length in enumerate(lengths):
        if length > max_tokens:
            name = f"sample {i}" + ("" if sample_ids is None else f" (id {sample_ids[i]})")
            raise AlpError(f"{name} has {length} tokens, more than actor.max_tokens_per_microbatch "
                           f"({max_tokens}); raise actor.max_tokens_per_microbatch to at least {length}, or lower "
                           "rollout.max_new_tokens / data.max_prompt_tokens (nothing is truncated)")
    if count > len(lengths):
        raise ValueError(f"plan_micro_batches: {count} micro-batches asked of {len(lengths)} samples")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    while len(bins) < count:
        largest = max((b for b in range(len(bins)) if len(bins[b]) > 1),
                      key=lambda b: (sum(lengths[i] for i in bins[b]), -min(bins[b])))
        members = sorted(bins.pop(largest), key=lambda i: (-lengths[i], i))
        halves: list[list[int]] = [[], []]
        for i in members:  # alternate the longest into the lighter half
            min(halves, key=lambda h: (sum(lengths[j] for j in h), len(h))).append(i)
        bins += halves
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def balanced_shares(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Split the samples ``lengths`` (a mini-batch) into ``ranks`` shares of equal size balanced by tokens.

    Longest first, each sample goes to the share with the fewest tokens among those with room (ties: the
    lowest rank), so the same lengths give the same shares on every rank; the shares' token counts differ
    by at most the longest sample. Each share lists its samples in index order. Equal sizes keep every
    rank's per-sample tensors the same shape (the metrics gather them) and let every rank split its share
    into as many micro-batches as any other rank needs.
    """
    if len(lengths) % ranks:
        raise ValueError(f"balanced_shares: {len(lengths)} samples do not split into {ranks} equal shares")
    size = len(lengths) // ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    tokens = [0] * ranks
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min((r for r in range(ranks) if len(shares[r]) < size), key=lambda r: (tokens[r], r))
        shares[rank].append(i)
        tokens[rank] += lengths[i]
    return [sorted(share) for share in shares]


def share_indices(lengths: Sequence[int], config, dp_size: int, dp_rank: int) -> list[list[int]]:
    """Which samples of a rollout batch (indices into ``lengths``) data-parallel rank ``dp_rank`` trains on,
    one list per mini-batch: ``config.num_mini_batches`` contiguous mini-batches, each split into
    ``dp_size`` shares, contiguous for padded micro-batches, :func:`balanced_shares` for packed ones
    (``config``: the actor's settings). The same lengths give the same answer on every rank."""
    from alp_megatron.errors import ConfigError

    k, packed = config.num_mini_batches, config.max_tokens_per_microbatch is not None
    mbs = 1 if packed else config.micro_batch_size
    if len(lengths) % (k * dp_size * mbs):
        micro = "" if packed else f" x micro-batches of {mbs}"
        raise ConfigError(
            "actor.num_mini_batches",
            f"a rollout batch of {len(lengths)} samples does not split into {k} mini-batches x {dp_size} "
            f"data-parallel ranks{micro}",
            f"make prompts x samples_per_prompt a multiple of {k * dp_size * mbs}",
        )
    per_mini = len(lengths) // k
    per_rank = per_mini // dp_size
    shares = []
    for m in range(k):
        start = m * per_mini
        if packed:
            mine = balanced_shares(lengths[start : start + per_mini], dp_size)[dp_rank]
            shares.append([start + i for i in mine])
        else:
            shares.append(list(range(start + dp_rank * per_rank, start + (dp_rank + 1) * per_rank)))
    return shares


def mini_batch_lengths(lengths: Sequence[int], num_mini_batches: int) -> list[list[int]]:
    per_mini = len(lengths) // num_mini_batches
    return [list(lengths[m * per_mini : (m + 1) * per_mini]) for m in range(num_mini_batches)]


def micro_batch_counts(lengths: Sequence[int], max_tokens: int, ranks: int) -> list[int]:
    """How many micro-batches :func:`plan_micro_batches` makes for each rank's :func:`balanced_shares`."""
    return [len(plan_micro_batches([lengths[i] for i in share], max_tokens))
            for share in balanced_shares(lengths, ranks)]


def packed_micro_batch(batch: TrainingBatch, indices: Sequence[int], pad_to_multiple: int = 1,
                       total: Optional[int] = None) -> dict:
    """The samples ``indices`` of ``batch`` as one packed micro-batch.

    Inputs ``tokens``, ``position_ids`` (restarting at 0 per sample) and ``packed_targets``: ``[1, T]``, the
    samples concatenated without padding, then padded to ``total`` rows (or to their sum rounded up to
    ``pad_to_multiple``: sequence parallelism splits ``T``). ``lengths`` and ``sample_ids`` ``[n]`` describe
    the packing (attention stays inside each sample; the ALP noise is keyed per token). What the loss reads
    stays per sample, cut to the longest of them (``L``): ``loss_mask``, ``rollout_logprobs`` (and
    ``old_logprobs`` / ``ref_logprobs`` once computed) ``[n, L]``, ``advantages`` ``[n]``, and
    ``unpack_index`` ``[n, L]``, where sample ``i``'s position ``j`` sits in the packed row (positions past a
    sample's end point at its last token; the loss mask is 0 there). ``rows``: ``indices``. Each per-token
    extra is packed like the tokens, ``[1, T, ...]``, under ``EXTRA_PREFIX + name``.
    """
    rows = torch.as_tensor(list(indices), dtype=torch.long)
    lengths = batch.lengths[rows]
    used = int(lengths.sum())
    size = total if total is not None else -(-used // pad_to_multiple) * pad_to_multiple
    if size < used:
        raise ValueError(f"packed_micro_batch: {used} tokens do not fit in {size} rows")
    longest = int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    tokens = torch.zeros((1, size), dtype=torch.long)
    targets = torch.zeros((1, size), dtype=torch.long)
    positions = torch.zeros((1, size), dtype=torch.long)
    for row, start, length in zip(rows.tolist(), starts.tolist(), lengths.tolist()):
        tokens[0, start : start + length] = batch.tokens[row, :length]
        targets[0, start : start + length] = batch.targets[row, :length]
        positions[0, start : start + length] = torch.arange(length)
    column = torch.arange(longest)
    unpack_index = starts[:, None] + torch.minimum(column[None, :], lengths[:, None] - 1)
    micro = {"tokens": tokens, "position_ids": positions, "packed_targets": targets, "lengths": lengths,
             "sample_ids": batch.sample_ids[rows], "advantages": batch.advantages[rows], "unpack_index": unpack_index,
             "rows": rows}
    for name, value in batch.extras.items():  # per token, packed like the tokens: [1, T, ...]
        packed = value.new_zeros((1, size, *value.shape[2:]))
        for row, start, length in zip(rows.tolist(), starts.tolist(), lengths.tolist()):
            packed[0, start : start + length] = value[row, :length]
        micro[EXTRA_PREFIX + name] = packed
    for name in LOSS_FIELDS:
        value = getattr(batch, name)
        if value is not None:
            micro[name] = value[rows, :longest]
    return micro
