"""The ``tensor`` transport: ``/update_weights_from_tensor`` with flattened buckets.

Each bucket is packed into one byte buffer (:func:`flatten_bucket`) and pickled with SGLang's
``MultiprocessingSerializer``, once per engine TP rank (rank i reads payload i only; a payload per rank
keeps the producer-side CUDA IPC reference counts right). The pickle carries a handle, not the bytes:

* CUDA tensors become CUDA IPC handles, with ``monkey_patch_torch_reductions`` mapping device indices to
  UUIDs so that each engine rank opens them on the right GPU. After the engines answer, the buffer is
  dropped and ``torch.cuda.ipc_collect`` releases the producer-side IPC cache.
* CPU tensors become shared-memory files: the ``file_system`` sharing strategy is set around allocation
  and pickling only (the default ``file_descriptor`` strategy makes the engine ask this process for the
  descriptor over an authenticated socket it cannot join, and SGLang's scheduler dies). The buffer is
  refilled only after every engine has answered; it is kept from bucket to bucket and from sync to sync
  (one bucket of shared memory, freed by :meth:`TensorTransport.close`), since filling fresh shared
  memory costs page faults several times the copy itself.

Trainer and engines must share a host (and, for CUDA IPC, the GPUs).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from alp_megatron.bridge.transports import (
    Bucket,
    EngineTarget,
    StagingBuffer,
    TransportError,
    aligned_order,
    describe,
    flatten_bucket,
)
from alp_megatron.errors import ConfigError
from alp_megatron.rollout.errors import EngineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorTransportConfig:
    """``max_parallel_engines``: engines written to at once (each holds a handle to the same buffer)."""

    max_parallel_engines: int = 8

    def __post_init__(self):
        if not isinstance(self.max_parallel_engines, int) or self.max_parallel_engines < 1:
            raise ConfigError("weight_sync.tensor.max_parallel_engines", f"{self.max_parallel_engines!r} is not >= 1",
                              "set a positive number of engines to write to at once")


@contextlib.contextmanager
def file_system_sharing():
    """Share CPU tensors through named shared-memory files for the duration of the block only."""
    import torch.multiprocessing as mp

    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        mp.set_sharing_strategy(previous)


class TensorTransport:
    """Flattened buckets through ``/update_weights_from_tensor`` (``load_format="flattened_bucket"``)."""

    name = "tensor"
    requires_session = True
    per_tp_rank = True

    def __init__(self, config: TensorTransportConfig = TensorTransportConfig()):
        self.config = config
        self._engines: list[EngineTarget] = []
        self._shared = StagingBuffer(self._allocate_shared)

    @staticmethod
    def _allocate_shared(nbytes: int, device) -> torch.Tensor:
        with file_system_sharing():
            return torch.empty(nbytes, dtype=torch.uint8).share_memory_()

    def connect(self, engines: Sequence[EngineTarget]) -> None:
        self._engines = list(engines)

    def push(self, bucket: Bucket, weight_version: Optional[str] = None, flush_cache: bool = False) -> None:
        if not self._engines:
            raise TransportError("tensor transport: push() before connect(engines)")
        bucket = aligned_order(bucket)
        on_gpu = bucket[0][1].is_cuda
        if on_gpu:
            payloads, buffer = self._serialize_cuda(bucket)
        else:
            payloads, buffer = self._serialize_cpu(bucket)
        try:
            self._send(payloads, bucket, weight_version, flush_cache)
        finally:
            # The engines have loaded the bucket by now: drop this bucket's CUDA buffer and release the
            # producer-side IPC references (CPU: the shared buffer is kept for the next bucket).
            del buffer
            _collect_cuda_ipc()

    def commit(self, weight_version: str, flush_cache: bool = True) -> None:
        """Each push is loaded by the engine when its request returns. What is left is the last bucket's
        CUDA buffer: an engine with TP > 1 may still have held it (its ranks release their views after a
        barrier) when that push collected, so it is collected again here."""
        _collect_cuda_ipc()

    def close(self) -> None:
        self._engines = []
        self._shared.release()
        _collect_cuda_ipc()

    # ---------------------------------------------------------------------------------------------

    def _payload_strings(self, buffer: torch.Tensor, metadata: list) -> dict[str, list[str]]:
        from sglang.srt.utils import MultiprocessingSerializer

        payload = {"flattened_tensor": buffer, "metadata": metadata}
        return {
            engine.url: [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(engine.tp_size)]
            for engine in self._engines
        }

    def _serialize_cpu(self, bucket: Bucket):
        buffer, metadata = flatten_bucket(bucket, allocate=self._shared.get)
        with file_system_sharing():
            return self._payload_strings(buffer, metadata), buffer

    def _serialize_cuda(self, bucket: Bucket):
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
        buffer, metadata = flatten_bucket(bucket)
        return self._payload_strings(buffer, metadata), buffer

    def _send(self, payloads: dict[str, list[str]], bucket: Bucket, weight_version: Optional[str],
              flush_cache: bool) -> None:
        def send(engine: EngineTarget) -> None:
            engine.control.update_weights_from_tensor(
                payloads[engine.url], load_format="flattened_bucket", weight_version=weight_version,
                flush_cache=flush_cache)

        workers = min(self.config.max_parallel_engines, len(self._engines))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weights-tensor") as pool:
            futures = [(engine, pool.submit(send, engine)) for engine in self._engines]
            errors = []
            for engine, future in futures:
                try:
                    future.result()
                except EngineError as error:
                    errors.append(error)
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise TransportError(
                f"tensor transport: {len(errors)} engines refused the {describe(bucket)}: "
                + "; ".join(str(e) for e in errors))


def _collect_cuda_ipc() -> None:
    """Free the CUDA buffers the engines have let go of (none without CUDA in use)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
