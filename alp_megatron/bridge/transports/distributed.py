"""The ``distributed`` transport: a broadcast group spanning the trainer and every engine TP rank.

The group is a second world, independent of the trainer's own process groups: the trainer joins as
rank 0 (through SGLang's ``init_custom_process_group``, the helper the engines use on their side) and
engine ``i``'s TP ranks join as ``rank_offset_i + tp_rank``, with ``rank_offset_0 = 1`` and
``world_size = 1 + sum(tp sizes)``. Per bucket, every engine gets an ``/update_weights_from_distributed``
request (``load_format="flattened_bucket"``: names, dtypes and shapes describe one uint8 buffer) and, while
those requests are in flight, the trainer broadcasts the flattened bucket once to all of them. NCCL on GPU,
gloo on CPU. The group is built at the first :meth:`connect` and reused by later syncs to the same engines;
:meth:`close` destroys it on both sides (the driver closes it after a failed sync, so a retry builds a new one).

NCCL refuses a group with two ranks on one GPU, so over NCCL the engines must run on other GPUs than the
trainer's rank 0 (disaggregated; a colocated run is refused at start and takes the ``tensor`` transport).
Each engine rank is addressed by its TP rank, so engines must run without pipeline or (non-attention) data
parallelism, which :class:`~alp_megatron.bridge.weight_sync.WeightSync` checks at the first sync.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence
from urllib.parse import urlparse

import torch

from alp_megatron.bridge.transports import (
    Bucket,
    EngineTarget,
    StagingBuffer,
    TransportError,
    aligned_order,
    describe,
    dtype_name,
    flatten_bucket,
)
from alp_megatron.errors import ConfigError
from alp_megatron.rollout.errors import EngineError
from alp_megatron.rollout.process import free_port, is_loopback

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
_group_ids = itertools.count()


@dataclass(frozen=True)
class DistributedTransportConfig:
    """How the trainer builds the broadcast group.

    ``master_address``: the trainer address every engine can reach (None: loopback when all engines are
    local, else the local address that routes to the first engine). ``master_port``: 0 picks a free port
    per group. ``backend``: None means nccl when CUDA is available, else gloo. ``group_name`` is a prefix
    (each group gets a fresh suffix, so a rebuilt group never meets a stale one). ``timeout_s`` bounds the
    group's rendezvous and each broadcast.
    """

    master_address: Optional[str] = None
    master_port: int = 0
    backend: Optional[str] = None
    group_name: str = "weight_update_group"
    timeout_s: float = 300.0

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError("weight_sync.distributed.backend", f"{self.backend!r} is not a backend",
                              f"choose one of {BACKENDS}, or leave it unset (nccl with CUDA, else gloo)")
        if not isinstance(self.master_port, int) or not 0 <= self.master_port <= 65535:
            raise ConfigError("weight_sync.distributed.master_port", f"{self.master_port!r} is not a TCP port",
                              "use 1..65535, or 0 to pick a free port")
        if not self.group_name:
            raise ConfigError("weight_sync.distributed.group_name", "it is empty", "give a non-empty name")
        if not self.timeout_s > 0:
            raise ConfigError("weight_sync.distributed.timeout_s", f"{self.timeout_s!r} is not > 0",
                              "give the seconds a rendezvous or broadcast may take")


def reachable_address(engines: Sequence[EngineTarget]) -> str:
    """The local address the engines can connect back to (loopback when they all run on this host)."""
    hosts = [urlparse(engine.url).hostname or "" for engine in engines]
    if all(is_loopback(host) for host in hosts):
        return "127.0.0.1"
    remote = next(host for host in hosts if not is_loopback(host))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((remote, 9))  # no packet is sent; this only picks the outgoing interface
        return probe.getsockname()[0]


def rank_offsets(engines: Sequence[EngineTarget]) -> tuple[list[int], int]:
    """Each engine's first rank in the group, and the group's world size (the trainer is rank 0)."""
    offsets, next_rank = [], 1
    for engine in engines:
        offsets.append(next_rank)
        next_rank += engine.tp_size
    return offsets, next_rank


class DistributedTransport:
    """Flattened buckets broadcast over a trainer + engines process group."""

    name = "distributed"
    requires_session = True
    per_tp_rank = True

    def __init__(self, config: DistributedTransportConfig = DistributedTransportConfig()):
        self.config = config
        self._engines: list[EngineTarget] = []
        self._group = None
        self._group_name: Optional[str] = None
        self._key: Optional[tuple] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._staging = StagingBuffer()  # the broadcast source, reused from bucket to bucket

    @property
    def group_name(self) -> Optional[str]:
        """The name of the live group, or None when there is none."""
        return self._group_name

    @property
    def backend(self) -> str:
        if self.config.backend:
            return self.config.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    # ---------------------------------------------------------------------------------------------

    def connect(self, engines: Sequence[EngineTarget]) -> None:
        key = tuple((engine.url, engine.tp_size) for engine in engines)
        if self._group is not None and key == self._key:
            return
        self.close()
        self._engines = list(engines)
        self._pool = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="weights-dist")
        self._create_group()
        self._key = key

    def _create_group(self) -> None:
        from sglang.srt.utils import init_custom_process_group

        address = self.config.master_address or reachable_address(self._engines)
        port = self.config.master_port or free_port("127.0.0.1" if is_loopback(address) else "0.0.0.0")
        offsets, world_size = rank_offsets(self._engines)
        name = f"{self.config.group_name}_{next(_group_ids)}"
        logger.info("building weight broadcast group %s at %s:%d, world size %d, backend %s",
                    name, address, port, world_size, self.backend)
        joins = {engine.url: self._pool.submit(engine.control.init_weights_update_group, address, port, offset,
                                               world_size, name, self.backend)
                 for engine, offset in zip(self._engines, offsets)}
        created: dict = {}

        def join() -> None:
            try:
                timeout = timedelta(seconds=self.config.timeout_s)
                # The trainer hosts the group's store itself. Left to init_method="tcp://...", torch would not
                # under torchrun: there (TORCHELASTIC_USE_AGENT_STORE) every rank takes the store for one its
                # elastic agent hosts, so the trainer, like the engines, waits for a store nobody serves.
                # The engines reach it through init_method, which prefixes their keys with the group name.
                store = torch.distributed.PrefixStore(name, torch.distributed.TCPStore(
                    address, port, world_size, is_master=True, timeout=timeout, multi_tenant=True))
                created["group"] = init_custom_process_group(
                    backend=self.backend, store=store, world_size=world_size, rank=0, group_name=name,
                    timeout=timeout)
            except Exception as error:  # reported below with the engines' side of the story
                created["error"] = error

        # The trainer's join blocks until every engine rank has joined; an engine that refuses never will,
        # so its refusal is watched for while the join runs in the background.
        joiner = threading.Thread(target=join, name="weights-dist-join", daemon=True)
        joiner.start()
        failed = self._wait(joins, lambda: not joiner.is_alive(), what=f"joining group {name}")
        joiner.join(timeout=0 if failed else None)
        if failed or "error" in created:
            if "group" in created:
                self._destroy_local(created["group"])
            cause = "; ".join(str(e) for e in failed) or f"trainer side: {created.get('error')}"
            raise TransportError(
                f"distributed transport: could not build group {name} at {address}:{port} with engines "
                f"{[e.url for e in self._engines]}: {cause}. Fix: make {address}:{port} reachable from every "
                "engine (weight_sync.distributed.master_address / master_port) and check the engines' logs")
        self._group, self._group_name = created["group"], name

    def _wait(self, futures: dict[str, Future], done, what: str, given_up=lambda: False) -> list[Exception]:
        """Wait until ``done()`` and all ``futures`` finish, or one future fails, or ``given_up()``; return the
        failures."""
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            failures = [f.exception() for f in futures.values() if f.done() and f.exception() is not None]
            if failures or given_up():
                return failures
            if done() and all(f.done() for f in futures.values()):
                return []
            if time.monotonic() > deadline:
                waiting = [url for url, f in futures.items() if not f.done()]
                return [TransportError(f"{what}: no answer within {self.config.timeout_s:.0f} s from {waiting}")]
            time.sleep(0.005)

    # ---------------------------------------------------------------------------------------------

    def push(self, bucket: Bucket, weight_version: Optional[str] = None, flush_cache: bool = False) -> None:
        if self._group is None:
            raise TransportError("distributed transport: push() before connect(engines)")
        bucket = aligned_order(bucket)
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        # non_blocking only onto the GPU: a non-blocking copy to the CPU can still be running when the CPU reads it
        bucket = [(name, tensor.to(device, non_blocking=device.type == "cuda")) for name, tensor in bucket]
        flat, _ = flatten_bucket(bucket, allocate=self._staging.get)
        names = [name for name, _ in bucket]
        dtypes = [dtype_name(tensor.dtype) for _, tensor in bucket]
        shapes = [list(tensor.shape) for _, tensor in bucket]
        requests = {engine.url: self._pool.submit(
            engine.control.update_weights_from_distributed, names, dtypes, shapes, group_name=self._group_name,
            load_format="flattened_bucket", weight_version=weight_version, flush_cache=flush_cache)
            for engine in self._engines}
        broadcaster, outcome = _broadcast_in_background(flat, self._group)
        failures = self._wait(requests, lambda: not broadcaster.is_alive(),
                              what=f"broadcasting the {describe(bucket)}", given_up=lambda: "error" in outcome)
        if failures or "error" in outcome:
            # A refused request leaves its engine out of the broadcast, which then never completes: the
            # group is unusable, and the driver's close() destroys it.
            urls = [e.url for e in failures if isinstance(e, EngineError)]
            causes = failures or [f"trainer side: {outcome['error']}"]
            raise TransportError(
                f"distributed transport: the {describe(bucket)} did not reach {urls or 'every engine'}: "
                + "; ".join(str(e) for e in causes))

    def commit(self, weight_version: str, flush_cache: bool = True) -> None:
        """Nothing to do: each broadcast is loaded by the engines when their requests return."""

    # ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the group on every engine (best effort: an engine may be gone) and on the trainer, both
        sides at once (a backend whose teardown waits for its peers would otherwise wait on itself)."""
        if self._group is not None:
            # A pool of its own: after a failed push, update requests may still hang in the transport's pool.
            pool = ThreadPoolExecutor(max_workers=max(1, len(self._engines)), thread_name_prefix="weights-dist-close")
            destroys = {engine.url: pool.submit(engine.control.destroy_weights_update_group, self._group_name)
                        for engine in self._engines}
            self._destroy_local(self._group)
            for url, future in destroys.items():
                try:
                    future.result(timeout=60)
                except Exception as error:
                    logger.warning("could not destroy weight group %s on %s: %s", self._group_name, url, error)
            pool.shutdown(wait=False)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._staging.release()
        self._group, self._group_name, self._key, self._pool, self._engines = None, None, None, None, []

    @staticmethod
    def _destroy_local(group) -> None:
        try:
            torch.distributed.destroy_process_group(group)
        except Exception as error:
            logger.warning("could not destroy the trainer side of a weight group: %s", error)


def _broadcast_in_background(flat: torch.Tensor, group) -> tuple[threading.Thread, dict]:
    """Broadcast ``flat`` from rank 0 of ``group`` on a thread of its own; its error, if any, lands in the
    returned dict under ``"error"``.

    Not on the caller's thread: the first collective of a NCCL group also builds the group's communicator,
    and that call blocks until every rank has joined, so an engine that refused its request would hang
    the caller instead of failing the push. The thread works on the tensor's CUDA device and the caller's
    stream, and ends when the broadcast has completed.
    """
    outcome: dict = {}
    # The caller's stream wrote ``flat``; the broadcast is ordered after it on that stream.
    stream = torch.cuda.current_stream(flat.device) if flat.is_cuda else None

    def run() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None:
                    torch.cuda.set_device(flat.device)
                torch.distributed.broadcast(flat, group=group, group_src=0, async_op=True).wait()
                if stream is not None:  # wait() only orders the stream: the thread ends when the bytes are sent
                    stream.synchronize()
        except Exception as error:  # reported by push()
            outcome["error"] = error

    thread = threading.Thread(target=run, name="weights-dist-broadcast", daemon=True)
    thread.start()
    return thread, outcome
