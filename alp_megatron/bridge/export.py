"""Stream the Megatron model's weights as full Hugging Face tensors, in buckets of bounded size.

Every rank of the model iterates :func:`export_hf_buckets` and receives the same buckets in the same order.
Per tensor, the pipeline stage that holds it gathers the tensor-parallel shards (all-gather over the
tensor- or expert-tensor-parallel group), turns them into HF tensors, gathers the other expert-parallel
ranks' experts (all-gather over the expert group) and broadcasts the result to the other stages. Only one
bucket plus the tensor being gathered are alive at a time, never the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from alp_megatron.bridge.mapping import (
    Binding, ParallelRanks, WeightMappingError, bind_parameters, hf_tensor_names,
)
from alp_megatron.errors import ConfigError
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.provider import rank_device

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class _Item:
    """One exported Megatron parameter: the HF tensors it yields, and the stage that holds it."""

    order: tuple
    names: list[str]  # expert tensors: those of every expert-parallel rank, rank by rank
    shapes: list[tuple]
    dtype: torch.dtype
    stage: int  # pipeline rank holding it
    binding: Optional[Binding] = None  # set on the ranks of that stage


def export_hf_buckets(
    model_chunks: Sequence[torch.nn.Module],
    arch: ModelArch,
    bucket_bytes: int,
    dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[Bucket]:
    """Yield lists of ``(hf_name, tensor)`` holding at most ``bucket_bytes`` each; a tensor larger than
    ``bucket_bytes`` comes alone. Tensors are full (unsharded, vocab padding stripped), named and shaped as
    in the HF checkpoint, in the model's dtype or ``dtype``. ``log_sigma`` and other non-weights never appear.

    Every rank of the model (all TP/PP/EP/DP ranks) must call this and iterate to the end: the collectives
    run as the iteration proceeds. Tensors may share memory with the parameters (unsharded layouts): treat
    them as read-only, and drop each bucket before asking for the next to keep memory bounded.
    ``progress(done_bytes, total_bytes)``: called as each tensor is gathered (bytes of the whole model).
    """
    if not (isinstance(bucket_bytes, int) and bucket_bytes > 0):
        raise ConfigError("bucket_bytes", f"must be a positive number of bytes, got {bucket_bytes!r}",
                          "use e.g. 256 MiB (268435456)")
    ranks = ParallelRanks.current()
    items = _catalogue(_exported_bindings(model_chunks, arch, ranks), arch, ranks, dtype)
    named = ((name, tensor) for item in items
             for name, tensor in zip(item.names, _materialise(item, arch, ranks, dtype)))
    if progress is not None:
        named = _reporting(named, sum(_nbytes(shape, item.dtype) for item in items for shape in item.shapes),
                           progress)
    yield from bucketed(named, bucket_bytes)


def _exported_bindings(model_chunks: Sequence[torch.nn.Module], arch: ModelArch,
                       ranks: ParallelRanks) -> list[Binding]:
    """This rank's exported parameters, or the same error on every rank: a parameter the mapping does not know
    may sit on one pipeline stage only, and the other stages must not wait for it in the collectives."""
    from alp_megatron.bridge.hf_import import agree_on_problems, problem_of

    bindings, problems = [], []
    try:
        bindings = [b for b in bind_parameters(model_chunks, arch, ranks) if b.exported]
    except Exception as error:  # noqa: BLE001 - agreed below, so no rank waits alone in a collective
        problems = [problem_of(error)]
    problems = agree_on_problems(problems)
    if problems:
        raise WeightMappingError("export", "; ".join(problem for problem, _ in problems),
                                 "; ".join(dict.fromkeys(fix for _, fix in problems)))
    return bindings


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _reporting(named: Iterable[tuple[str, torch.Tensor]], total: int,
               progress: Callable[[int, int], None]) -> Iterator[tuple[str, torch.Tensor]]:
    done = 0
    for name, tensor in named:
        done += tensor.numel() * tensor.element_size()
        progress(done, total)
        yield name, tensor


def bucketed(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` (a larger tensor comes
    alone). Lazy: a tensor is pulled only when the bucket before it is complete or still has room."""
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _catalogue(bindings: list[Binding], arch: ModelArch, ranks: ParallelRanks,
               dtype: Optional[torch.dtype]) -> list[_Item]:
    """All items of the model in export order, the same list on every rank (one object all-gather over the
    pipeline group tells each stage what the others hold)."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    mine = []
    for binding in bindings:
        shapes = binding.hf_shapes(arch, ranks)
        names = binding.hf_names()
        if binding.is_expert:  # the same slot on every expert-parallel rank holds other experts
            names = [name for q in range(ranks.expert.size)
                     for name in binding.hf_names(_experts_of(binding, q, arch, ranks))]
            shapes = shapes * ranks.expert.size
        mine.append(_Item(binding.order, names, shapes, dtype or binding.param.dtype, stage, binding))
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) > 1:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, [(i.order, i.names, i.shapes, i.dtype, i.stage) for i in mine], group=group)
        local = {item.order: item for item in mine}
        items = [local.get(entry[0]) or _Item(*entry) for rank_items in everyone for entry in rank_items]
    else:
        items = mine
    items.sort(key=lambda item: item.order)
    exported = [n for item in items for n in item.names]
    expected = hf_tensor_names(arch)
    if sorted(exported) != sorted(expected):
        raise WeightMappingError(
            "export", f"the model's parameters give {sorted(set(exported) ^ set(expected))} "
            "beyond or short of the HF tensors of its architecture",
            "export every pipeline stage's chunks together, built for this architecture",
        )
    return items


def _experts_of(binding: Binding, expert_rank: int, arch: ModelArch, ranks: ParallelRanks) -> list[int]:
    """The global experts that ``expert_rank`` holds in this binding's slot (ranks hold equal blocks)."""
    shift = (expert_rank - ranks.expert.rank) * (arch.num_experts // ranks.expert.size)
    return [e + shift for e in binding.experts]


def _materialise(item: _Item, arch: ModelArch, ranks: ParallelRanks,
                 dtype: Optional[torch.dtype]) -> list[torch.Tensor]:
    """The item's full HF tensors on every rank (collectives: TP or expert-TP, EP, then PP)."""
    from megatron.core import parallel_state

    tensors: list[torch.Tensor] = []
    if item.binding is not None:
        binding = item.binding
        stacked = _gather_shards(binding, ranks)
        tensors = binding.layout.merge(stacked, arch, max(1, len(binding.experts)))
        del stacked
        tensors = [t.to(dtype) if dtype is not None else t for t in tensors]
        if binding.is_expert and ranks.expert.size > 1:
            tensors = _gather_experts(tensors, parallel_state.get_expert_model_parallel_group())
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pipeline) == 1:
        return tensors
    source = dist.get_global_rank(pipeline, item.stage)
    out = []
    for index, shape in enumerate(item.shapes):
        tensor = (tensors[index].contiguous() if tensors
                  else torch.empty(shape, dtype=item.dtype, device=rank_device()))
        dist.broadcast(tensor, src=source, group=pipeline)
        out.append(tensor)
    return out


def _gather_shards(binding: Binding, ranks: ParallelRanks) -> torch.Tensor:
    """``[group size, *local shape]``: this parameter's shards of every rank of the group that splits it."""
    from megatron.core import parallel_state

    local = binding.param.detach()
    shard = binding.shard(ranks)
    if shard.size == 1:
        return local.unsqueeze(0)
    group = (parallel_state.get_expert_tensor_parallel_group() if binding.is_expert
             else parallel_state.get_tensor_model_parallel_group())
    return _all_gather(local, shard.size, group)


def _gather_experts(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The same tensors from every expert-parallel rank, rank by rank (each rank holds other experts)."""
    size = dist.get_world_size(group)
    gathered = [_all_gather(tensor, size, group) for tensor in tensors]
    return [gathered[i][q] for q in range(size) for i in range(len(tensors))]


def _all_gather(tensor: torch.Tensor, size: int, group) -> torch.Tensor:
    """``[size, *tensor.shape]``: ``tensor`` of every rank of ``group``, in group-rank order."""
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)  # gloo wants the ranks along dim 0
    return out.view(size, *tensor.shape)
