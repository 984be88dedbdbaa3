"""The rollout batch from global rank 0 to the ranks that train on it: each data-parallel share once, as tensors.

Global rank 0 holds the scored rollout (:class:`TrainingBatch`). Every rank receives a small header (the
samples' lengths and the extras' names, dtypes and shapes) and works out which samples its data-parallel
rank trains on (:func:`~alp_megatron.trainer.batch.share_indices`: the same deterministic split on every
rank). Rank 0 then sends each data-parallel group's share, and only that share, to the group's first rank as
one buffer: the bytes of flat tensors (each sample's tokens without padding, its loss mask, rollout logprobs
and per-token extras, plus per-sample lengths, advantages and ids). That rank broadcasts the buffer inside
its group (the tensor-, pipeline- and context-parallel ranks of one data-parallel rank), and every rank
rebuilds its padded shares from it.

What travels, at 64 data-parallel ranks, 512 samples of up to 32k tokens: the header is one integer a sample;
rank 0 sends each group 1/64 of the batch's real tokens in one message (13 bytes a token: int64 id, float32
loss mask and logprob; plus the extras, e.g. MoE routes) instead of pickling the whole padded ``[512, 32k]``
batch to every rank (about 2.5 GB each, 160 GB in all with 64 ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from alp_megatron.model.provider import rank_device
from alp_megatron.trainer.batch import EXTRA_PREFIX, TrainingBatch, mini_batch_lengths, share_indices

_PER_TOKEN = {"tokens": torch.long, "loss_mask": torch.float32, "rollout_logprobs": torch.float32}
_PER_SAMPLE = {"lengths": torch.long, "advantages": torch.float32, "sample_ids": torch.long}


@dataclass
class LocalBatch:
    """What one rank trains on: its share of each mini-batch, and each whole mini-batch's sample lengths
    (every rank plans micro-batch counts from them)."""

    shares: list[TrainingBatch]
    mini_batch_lengths: list[list[int]]


def flatten(batch: TrainingBatch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The samples ``rows`` of ``batch`` as flat tensors: per token (no padding), per sample, and each per-token
    extra under ``EXTRA_PREFIX + name`` (``[tokens, ...]``)."""
    lengths = batch.lengths[rows]
    real = torch.arange(batch.seq_length)[None, :] < lengths[:, None]
    flat = {name: getattr(batch, name)[rows][real].to(dtype) for name, dtype in _PER_TOKEN.items()}
    flat.update({name: getattr(batch, name)[rows].to(dtype) for name, dtype in _PER_SAMPLE.items()})
    flat.update({EXTRA_PREFIX + name: value[rows][real] for name, value in batch.extras.items()})
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
    extras = {}
    for key, value in flat.items():
        if key.startswith(EXTRA_PREFIX):
            name = key[len(EXTRA_PREFIX):]
            extras[name] = value.new_zeros((count, seq_length, *value.shape[1:]), device="cpu")
            extras[name][real] = value.cpu()
    targets = torch.full_like(rows["tokens"], pad_id)
    targets[:, :-1] = rows["tokens"][:, 1:]
    return TrainingBatch(tokens=rows["tokens"], targets=targets,
                         position_ids=torch.arange(seq_length).expand(count, -1).contiguous(),
                         loss_mask=rows["loss_mask"], rollout_logprobs=rows["rollout_logprobs"],
                         advantages=flat["advantages"].cpu(), sample_ids=flat["sample_ids"].cpu(), lengths=lengths,
                         extras=extras)


def distribute(batch: Optional[TrainingBatch], config, pad_id: int = 0, pad_to_multiple: int = 1) -> LocalBatch:
    """Every rank: its :class:`LocalBatch` of ``batch`` (given on global rank 0, None elsewhere), its shares
    right-padded to their longest sample (rounded up to ``pad_to_multiple``).

    All ranks call this. ``config``: the actor's settings (how samples are split, :func:`share_indices`).
    """
    from megatron.core import parallel_state

    header = [None if batch is None else (batch.lengths.tolist(), [
        (name, value.dtype, tuple(value.shape[2:])) for name, value in batch.extras.items()])]
    dist.broadcast_object_list(header, src=0)
    lengths, extras = header[0]
    layout = {**{name: (dtype, ()) for name, dtype in _PER_TOKEN.items()},
              **{name: (dtype, None) for name, dtype in _PER_SAMPLE.items()},
              **{EXTRA_PREFIX + name: (dtype, shape) for name, dtype, shape in extras}}
    dp_size = parallel_state.get_data_parallel_world_size()
    indices = [share_indices(lengths, config, dp_size, rank) for rank in range(dp_size)]
    groups = _share_groups()
    mine = groups.member_of[dist.get_rank()]
    device = rank_device()
    wire: Optional[torch.Tensor] = None  # what travels: the share's tensors as one buffer of bytes
    if dist.get_rank() == 0:
        for dp_rank, rows in enumerate(indices):
            part = _as_bytes(flatten(batch, torch.tensor([i for share in rows for i in share])), layout)
            leader = groups.leaders[dp_rank]
            if leader == 0:
                wire = part
            else:
                dist.send(part.to(device), dst=leader)
    elif groups.leaders[mine] == dist.get_rank():
        wire = _empty(lengths, indices[mine], layout, device)
        dist.recv(wire, src=0)
    if groups.sizes[mine] > 1:
        wire = _empty(lengths, indices[mine], layout, device) if wire is None else wire.to(device)
        dist.broadcast(wire, src=groups.leaders[mine], group=groups.groups[mine])
    flat = _from_bytes(wire, lengths, indices[mine], layout)
    local = unflatten(flat, pad_id, pad_to_multiple)
    shares, start = [], 0
    for share in indices[mine]:
        shares.append(local.select(slice(start, start + len(share))))
        start += len(share)
    return LocalBatch(shares=shares, mini_batch_lengths=mini_batch_lengths(lengths, config.num_mini_batches))


def _shapes(lengths: list[int], shares: list[list[int]], layout: dict) -> dict[str, tuple[torch.dtype, tuple]]:
    """Each flat tensor's dtype and shape for the samples ``shares`` (sizes from ``lengths``); ``layout`` maps
    each name to (dtype, trailing shape per token, or None for one value per sample)."""
    rows = [i for share in shares for i in share]
    tokens = sum(lengths[i] for i in rows)
    return {name: (dtype, (len(rows),) if shape is None else (tokens, *shape))
            for name, (dtype, shape) in layout.items()}


def _empty(lengths: list[int], shares: list[list[int]], layout: dict, device) -> torch.Tensor:
    """The receive buffer for the samples ``shares``: all their tensors' bytes."""
    size = sum(math.prod(shape) * dtype.itemsize for dtype, shape in _shapes(lengths, shares, layout).values())
    return torch.empty(size, dtype=torch.uint8, device=device)


def _as_bytes(flat: dict[str, torch.Tensor], layout: dict) -> torch.Tensor:
    """The tensors of ``flat`` as one buffer of bytes, in ``layout``'s order (gloo and NCCL lack some dtypes:
    bytes travel whatever an extra's dtype)."""
    return torch.cat([flat[name].contiguous().view(-1).view(torch.uint8) for name in layout])


def _from_bytes(wire: torch.Tensor, lengths: list[int], shares: list[list[int]], layout: dict
                ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_as_bytes`."""
    flat, offset = {}, 0
    for name, (dtype, shape) in _shapes(lengths, shares, layout).items():
        size = math.prod(shape) * dtype.itemsize
        flat[name] = wire[offset : offset + size].view(dtype).view(shape)
        offset += size
    return flat


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
