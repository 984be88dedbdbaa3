"""Weight transports: how buckets of HF-named tensors reach every SGLang engine.

A transport addresses each engine's own URL (``sglang-router`` does not proxy the weight endpoints) and
sends what it is given; opening and closing SGLang's weight-update session, pausing generation and
retrying are the job of :mod:`alp_megatron.bridge.weight_sync`. One file per implementation:

* ``tensor`` (:mod:`.tensor`): ``/update_weights_from_tensor`` with flattened buckets, as CUDA IPC handles
  (GPU) or shared CPU memory (CPU); trainer and engines on the same host.
* ``distributed`` (:mod:`.distributed`): a process group spanning the trainer (rank 0) and every engine TP
  rank, ``/update_weights_from_distributed`` plus a broadcast per bucket (NCCL on GPU, gloo on CPU).
* ``disk`` (:mod:`.disk`): a safetensors folder and ``/update_weights_from_disk``; needs a folder both sides see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from alp_megatron.errors import AlpError, ConfigError

if TYPE_CHECKING:
    from alp_megatron.rollout.engine_control import EngineControl

Bucket = list[tuple[str, torch.Tensor]]


class TransportError(AlpError):
    """A transport could not deliver a bucket; names the engine URL(s) and the tensors involved."""


@dataclass(frozen=True)
class EngineTarget:
    """One SGLang engine a transport writes to: its control client and its tensor-parallel size."""

    control: "EngineControl"
    tp_size: int = 1

    @property
    def url(self) -> str:
        return self.control.url


@runtime_checkable
class WeightTransport(Protocol):
    """Moves buckets of full HF-named tensors into a fixed set of engines.

    Called by the rank that drives the update, in this order per sync::

        connect(engines) -> push(bucket) for every bucket -> commit(...) [-> close() at shutdown or on failure]

    ``requires_session`` says whether the pushes must run between ``begin_weight_update`` and
    ``end_weight_update`` on every engine (SGLang 0.5.23 refuses tensor and distributed updates outside one).
    ``per_tp_rank`` says whether each engine rank is addressed by its TP rank alone (a payload per TP rank, a
    group rank per TP rank), which engines with pipeline or data parallelism inside one server break.
    """

    name: str
    requires_session: bool
    per_tp_rank: bool

    def connect(self, engines: Sequence[EngineTarget]) -> None:
        """Prepare the pushes to ``engines`` (a process group, a staging folder); cheap when already done."""

    def push(self, bucket: Bucket, weight_version: Optional[str] = None, flush_cache: bool = False) -> None:
        """Deliver ``bucket`` to every engine. ``weight_version`` (set on the last bucket only) is stamped by
        the engine once the bucket is loaded; ``flush_cache`` drops the engine's prefix cache afterwards."""

    def commit(self, weight_version: str, flush_cache: bool = True) -> None:
        """After the last push: make the engines serve what was pushed, if pushing alone does not."""

    def close(self) -> None:
        """Release what :meth:`connect` built (idempotent); a later :meth:`connect` builds it again."""


TRANSPORTS = ("tensor", "distributed", "disk")


def make_transport(name: str, **options: Any) -> WeightTransport:
    """The transport called ``name`` (one of :data:`TRANSPORTS`), built from its config fields ``options``."""
    if name == "tensor":
        from alp_megatron.bridge.transports.tensor import TensorTransport, TensorTransportConfig

        return TensorTransport(TensorTransportConfig(**options))
    if name == "distributed":
        from alp_megatron.bridge.transports.distributed import DistributedTransport, DistributedTransportConfig

        return DistributedTransport(DistributedTransportConfig(**options))
    if name == "disk":
        from alp_megatron.bridge.transports.disk import DiskTransport, DiskTransportConfig

        return DiskTransport(DiskTransportConfig(**options))
    raise ConfigError("weight_sync.transport", f"{name!r} is not a transport", f"choose one of {TRANSPORTS}")


# -------------------------------------------------------------------------------------------------
# Flattened buckets, shared by the tensor and distributed transports.


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the spelling SGLang resolves with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def aligned_order(bucket: Bucket) -> Bucket:
    """``bucket`` reordered (stably) by element size, largest first.

    SGLang views each slice of a flattened uint8 buffer as its dtype, which needs a byte offset that is a
    multiple of the element size; with the widest dtypes first every offset is (fp8 weights beside fp32
    scales would otherwise misalign).
    """
    return sorted(bucket, key=lambda item: -item[1].element_size())


def flatten_bucket(bucket: Bucket, allocate=None) -> tuple[torch.Tensor, list]:
    """Pack ``bucket`` into one uint8 buffer, laid out as SGLang's ``FlattenedTensorBucket`` reads it.

    ``bucket`` must already be in :func:`aligned_order`. ``allocate(nbytes, device)`` makes the buffer
    (default ``torch.empty``), so a caller can place it in shared memory without a second copy. Returns the
    buffer (on the tensors' device) and the list of SGLang ``FlattenedTensorMetadata``.
    """
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    device = bucket[0][1].device
    metadata, offset = [], 0
    for name, tensor in bucket:
        if tensor.device != device:
            raise ValueError(f"bucket mixes devices: {name} is on {tensor.device}, the first tensor on {device}")
        nbytes = tensor.numel() * tensor.element_size()
        if offset % tensor.element_size():
            raise ValueError(f"{name} would start at byte {offset}, not a multiple of its {tensor.dtype} size; "
                             "order the bucket with aligned_order()")
        metadata.append(FlattenedTensorMetadata(name=name, shape=tensor.shape, dtype=tensor.dtype,
                                                start_idx=offset, end_idx=offset + nbytes, numel=nbytes))
        offset += nbytes
    buffer = (allocate or (lambda n, d: torch.empty(n, dtype=torch.uint8, device=d)))(offset, device)
    for (_, tensor), meta in zip(bucket, metadata):
        buffer[meta.start_idx:meta.end_idx].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return buffer, metadata


class StagingBuffer:
    """A byte buffer reused from bucket to bucket (and sync to sync), grown when a bucket needs more.

    Writing a bucket into freshly allocated memory costs a page fault per 4 KiB page, several times the
    copy itself on CPU; reusing one buffer pays that once. ``allocate(nbytes, device)`` makes a new one
    (e.g. in shared memory). The caller must not refill it while an engine may still read it.
    """

    def __init__(self, allocate=None):
        self._allocate = allocate or (lambda n, device: torch.empty(n, dtype=torch.uint8, device=device))
        self._buffer: Optional[torch.Tensor] = None

    def get(self, nbytes: int, device) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` on ``device``, a view of the kept buffer when it is large enough."""
        buffer = self._buffer
        if buffer is None or buffer.numel() < nbytes or buffer.device != torch.device(device):
            # Buckets vary in size: grow with headroom so that the largest bucket of a sync rarely regrows it.
            size = nbytes if buffer is None else max(nbytes, int(buffer.numel() * 1.25))
            self._buffer = None  # drop the old one first: both need not be alive at once
            buffer = self._buffer = self._allocate(size, device)
        return buffer[:nbytes]

    def release(self) -> None:
        self._buffer = None


def describe(bucket: Bucket, limit: int = 3) -> str:
    """A short description of a bucket for error messages: its size and first tensor names."""
    names = [name for name, _ in bucket]
    head = ", ".join(names[:limit]) + (f", ... ({len(names)} tensors)" if len(names) > limit else "")
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    return f"bucket of {nbytes / 2**20:.1f} MiB [{head}]"
