"""The rollout batch from global rank 0 to the ranks that train on it: each data-parallel share once, as tensors.

Global rank 0 holds the scored rollout (:class:`TrainingBatch`). Every rank receives a small header (the
samples' lengths) and works out which samples its data-parallel rank trains on
(:func:`~alp_megatron.trainer.batch.share_indices`: the same deterministic split on every rank). Rank 0 then
sends each data-parallel group's share, and only that share, to the group's first rank as flat tensors (each
sample's tokens without padding, its loss mask and rollout logprobs, plus per-sample lengths, advantages and
ids); that rank broadcasts it inside its group (the tensor-, pipeline- and context-parallel ranks of one
data-parallel rank), and every rank rebuilds its padded shares from it.

What travels, at 64 data-parallel ranks, 512 samples of up to 32k tokens: the header is one integer a sample;
rank 0 sends each group 1/64 of the batch's real tokens (13 bytes a token: int64 id, float32 loss mask and
logprob) instead of pickling the whole padded ``[512, 32k]`` batch to every rank (about 2.5 GB each, 160 GB in
all with 64 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from alp_megatron.model.provider import rank_device
from alp_megatron.trainer.batch import TrainingBatch, mini_batch_lengths, share_indices

_PER_TOKEN = {"tokens": torch.long, "loss_mask": torch.float32, "rollout_logprobs": torch.float32}
_PER_SAMPLE = {"lengths": torch.long, "advantages": torch.float32, "sample_ids": torch.long}


@dataclass
class LocalBatch:
    """What one rank trains on: its share of each mini-batch, and each whole mini-batch's sample lengths
    (every rank plans micro-batch counts from them)."""

    shares: list[TrainingBatch]
    mini_batch_lengths: list[list[int]]


def flatten(batch: TrainingBatch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The samples ``rows`` of ``batch`` as flat tensors: per token (no padding) and per sample."""
    lengths = batch.lengths[rows]
    real = torch.arange(batch.seq_length)[None, :] < lengths[:, None]
    flat = {name: getattr(batch, name)[rows][real].to(dtype) for name, dtype in _PER_TOKEN.items()}
    flat.update({name: getattr(batch, name)[rows].to(dtype) for name, dtype in _PER_SAMPLE.items()})
    return flat


def unflatten(flat: dict[str, torch.Tensor], pad_id: int = 0, pad_to_multiple: int = 1) -> TrainingBatch:
    """A :class:`TrainingBatch` of the flat samples, right-padded to the longest of them (rounded up to
    ``pad_to_multiple``); the inverse of :func:`flatten` on the real tokens."""
    lengths = flat["lengths"].cpu()
    count = len(lengths)
    seq_length = -(-int(lengths.max()) // pad_to_multiple) * pad_to_multiple if count else pad_to_multiple
    real = torch.arange(seq_length)[None, :] < lengths[:, None]
    rows = {}
    for name, dtype in _PER_TOKEN.items():
        fill = pad_id if name == "tokens" else 0
        rows[name] = torch.full((count, seq_length), fill, dtype=dtype)
        rows[name][real] = flat[name].cpu()
    targets = torch.full_like(rows["tokens"], pad_id)
    targets[:, :-1] = rows["tokens"][:, 1:]
    return TrainingBatch(tokens=rows["tokens"], targets=targets,
                         position_ids=torch.arange(seq_length).expand(count, -1).contiguous(),
                         loss_mask=rows["loss_mask"], rollout_logprobs=rows["rollout_logprobs"],
                         advantages=flat["advantages"].cpu(), sample_ids=flat["sample_ids"].cpu(), lengths=lengths)


def distribute(batch: Optional[TrainingBatch], config, pad_id: int = 0, pad_to_multiple: int = 1) -> LocalBatch:
    """Every rank: its :class:`LocalBatch` of ``batch`` (given on global rank 0, None elsewhere), its shares
    right-padded to their longest sample (rounded up to ``pad_to_multiple``).

    All ranks call this. ``config``: the actor's settings (how samples are split, :func:`share_indices`).
    """
    from megatron.core import parallel_state

    header = [None if batch is None else batch.lengths.tolist()]
    dist.broadcast_object_list(header, src=0)
    lengths = header[0]
    dp_size = parallel_state.get_data_parallel_world_size()
    indices = [share_indices(lengths, config, dp_size, rank) for rank in range(dp_size)]
    groups = _share_groups()
    mine = groups.member_of[dist.get_rank()]
    device = rank_device()
    flat: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        for dp_rank, rows in enumerate(indices):
            part = flatten(batch, torch.tensor([i for share in rows for i in share]))
            leader = groups.leaders[dp_rank]
            if leader == 0:
                flat = part
            else:
                for name in (*_PER_TOKEN, *_PER_SAMPLE):
                    dist.send(part[name].to(device), dst=leader)
    elif groups.leaders[mine] == dist.get_rank():
        flat = _receive(lengths, indices[mine], device, src=0)
    if groups.sizes[mine] > 1:
        if not flat:
            flat = _empty(lengths, indices[mine], device)
        for name in (*_PER_TOKEN, *_PER_SAMPLE):
            flat[name] = flat[name].to(device)
            dist.broadcast(flat[name], src=groups.leaders[mine], group=groups.groups[mine])
    local = unflatten(flat, pad_id, pad_to_multiple)
    shares, start = [], 0
    for share in indices[mine]:
        shares.append(local.select(slice(start, start + len(share))))
        start += len(share)
    return LocalBatch(shares=shares, mini_batch_lengths=mini_batch_lengths(lengths, config.num_mini_batches))


def _empty(lengths: list[int], shares: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Receive buffers for the samples ``shares`` (their sizes follow from ``lengths``)."""
    rows = [i for share in shares for i in share]
    tokens = sum(lengths[i] for i in rows)
    out = {name: torch.empty(tokens, dtype=dtype, device=device) for name, dtype in _PER_TOKEN.items()}
    out.update({name: torch.empty(len(rows), dtype=dtype, device=device) for name, dtype in _PER_SAMPLE.items()})
    return out


def _receive(lengths: list[int], shares: list[list[int]], device, src: int) -> dict[str, torch.Tensor]:
    out = _empty(lengths, shares, device)
    for name in (*_PER_TOKEN, *_PER_SAMPLE):
        dist.recv(out[name], src=src)
    return out


@dataclass
class _ShareGroups:
    member_of: dict  # global rank -> its data-parallel rank
    leaders: list  # data-parallel rank -> the lowest global rank holding it
    sizes: list  # data-parallel rank -> how many ranks hold it
    groups: list  # data-parallel rank -> the process group of the ranks holding it (None if one rank)


_cached: dict = {}


def _share_groups() -> _ShareGroups:
    """The ranks that hold each data-parallel rank's data (its tensor-, pipeline- and context-parallel ranks),
    found once per parallel state by gathering every rank's data-parallel rank."""
    from megatron.core import parallel_state

    key = (dist.get_world_size(), parallel_state.get_data_parallel_world_size(),
           id(parallel_state.get_data_parallel_group()))
    if key not in _cached:
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, parallel_state.get_data_parallel_rank())
        dp_size = parallel_state.get_data_parallel_world_size()
        holders = [[g for g, d in enumerate(ranks) if d == dp_rank] for dp_rank in range(dp_size)]
        groups = [dist.new_group(members) if len(members) > 1 else None for members in holders]
        _cached.clear()
        _cached[key] = _ShareGroups(member_of=dict(enumerate(ranks)), leaders=[m[0] for m in holders],
                                    sizes=[len(m) for m in holders], groups=groups)
    return _cached[key]
