"""Weight updates from a multi-rank trainer: every rank exports (the export is a collective), global
rank 0 sends through :class:`WeightSync`, and all ranks agree on the outcome before the next attempt.

A failed attempt is retried whole (a fresh export on every rank), ``retries`` times; then every rank
raises the same error, so no rank waits alone in a collective.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch.distributed as dist

from alp_megatron.bridge import fp8
from alp_megatron.bridge.weight_sync import EngineSpec, WeightSync, WeightSyncConfig, WeightSyncError
from alp_megatron.errors import AlpError, ConfigError

logger = logging.getLogger(__name__)


def check_transport_reaches_engines(transport: str, rollout_mode: str, cuda_available: bool) -> None:
    """Refuse ``distributed`` over NCCL (it is NCCL wherever CUDA is) into colocated engines: they run on the
    trainer's GPUs, and NCCL refuses a group with two ranks on one GPU."""
    if transport == "distributed" and rollout_mode == "colocated" and cuda_available:
        raise ConfigError("weight_sync.transport",
                          "distributed (an NCCL group) cannot reach colocated engines: they share the trainer's "
                          "GPUs, and NCCL refuses two ranks of one group on one GPU",
                          "use weight_sync.transport=tensor (CUDA IPC) with rollout.mode=colocated, or run the "
                          "engines on GPUs of their own (rollout.mode=disaggregated)")


def check_rollout_precision(precision: str, arch, engine_tp_size: int, cuda_available: bool) -> None:
    """Refuse ``rollout_precision: fp8`` where it cannot run: a model whose linears SGLang's 128x128 block FP8
    cannot hold at the engines' TP size (it would fail while loading), or a machine without CUDA (SGLang has
    no FP8 kernels there); ``fp8_rounded`` is the weight-rounding stand-in that runs anywhere."""
    if precision != "fp8":
        return
    problems = fp8.block_quant_problems(arch, engine_tp_size)
    if problems:
        raise ConfigError("weight_sync.rollout_precision",
                          f"is fp8, but SGLang's 128x128 block FP8 cannot hold {arch.architecture} (hidden "
                          f"{arch.hidden_size}) at server_tp_size {engine_tp_size}: " + "; ".join(problems),
                          "use weight_sync.rollout_precision=fp8_rounded (FP8 weight rounding in the engine's own "
                          "dtype), or a server_tp_size that leaves whole 128-blocks per rank")
    if not cuda_available:
        raise ConfigError("weight_sync.rollout_precision", "is fp8, but no GPU is visible and SGLang has no FP8 "
                          "kernels on CPU", "use weight_sync.rollout_precision=fp8_rounded (FP8 weight rounding "
                          "without FP8 activations)")


class _Drainable:
    """Wraps the export so rank 0 can finish iterating it (and its collectives) after a failed send."""

    def __init__(self, buckets: Iterable):
        self._iterator = iter(buckets)

    def __iter__(self) -> Iterator:
        return self._iterator

    def drain(self) -> None:
        for _ in self._iterator:
            pass


class TrainerWeightSync:
    """Created on every rank; ``engine_urls`` and ``tp_sizes`` matter on global rank 0 only."""

    def __init__(self, section, engine_urls=(), tp_sizes=(), api_key: Optional[str] = None):
        self.section = section
        self.rank0 = dist.get_rank() == 0
        self.sync: Optional[WeightSync] = None
        if self.rank0:
            engines = [EngineSpec(url=url, tp_size=tp, api_key=api_key) for url, tp in zip(engine_urls, tp_sizes)]
            self.sync = WeightSync(WeightSyncConfig(engines=engines, transport=section.transport,
                                                    pause_mode=section.pause_mode, fp8=section.fp8,
                                                    fp8_scale_format=section.fp8_scale_format,
                                                    fp8_ignored_layers=section.fp8_ignored_layers, retries=0,
                                                    transport_options=section.transport_options(),
                                                    check_names=section.check_names,
                                                    rollout_precision=section.rollout_precision))

    def update(self, policy, weight_version: str, targets: Optional[Callable[[], Sequence[str]]] = None,
               before_retry: Optional[Callable[[], None]] = None) -> dict:
        """Push ``policy``'s weights to every engine as ``weight_version``. Collective; returns metrics.

        Global rank 0 only: ``targets()`` names the engines of each attempt (default: all), and
        ``before_retry()`` runs before a retry (the fleet restarts an engine that died mid-update there, so the
        retry reaches its replacement)."""
        start = time.perf_counter()
        last_error = ""
        for attempt in range(1 + self.section.retries):
            buckets = _Drainable(policy.hf_buckets(self.section.bucket_bytes))
            outcome = [True, ""]
            if self.rank0:
                try:
                    if attempt and before_retry is not None:
                        before_retry()
                    report = self.sync.sync(lambda: buckets, weight_version, targets() if targets else None)
                    outcome = [True, f"{report.buckets} buckets, {report.bytes / 2**20:.1f} MiB"]
                except AlpError as error:
                    outcome = [False, str(error)]
                except Exception as error:  # noqa: BLE001 - broadcast below, else the other ranks wait alone
                    logger.exception("weight update to %s raised", weight_version)
                    outcome = [False, f"{type(error).__name__}: {error}"]
                finally:
                    buckets.drain()  # the other ranks are still in the export's collectives
            else:
                buckets.drain()
            dist.broadcast_object_list(outcome, src=0)
            if outcome[0]:
                return {"time_sync": time.perf_counter() - start, "sync_attempts": float(attempt + 1)}
            last_error = outcome[1]
            logger.warning("weight update to %s failed (attempt %d of %d): %s", weight_version, attempt + 1,
                           1 + self.section.retries, last_error)
        raise WeightSyncError(f"weight update to {weight_version} failed on every attempt: {last_error}")

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
