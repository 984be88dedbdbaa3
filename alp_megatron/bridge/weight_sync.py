"""Push the trainer's weights into every SGLang engine, whole or not at all.

One :meth:`WeightSync.sync` call, on the rank that drives the update:

1. check that every engine answers ``/model_info`` (before anything is changed anywhere);
2. pause generation on every engine (unless ``pause_mode`` is None: the caller pauses);
3. open SGLang's weight-update session on every engine (tensor and distributed transports);
4. stream the buckets through the transport (FP8-quantised first when the engines serve FP8), each
   checked against the served checkpoint's names and shapes when its folder is readable here
   (:class:`ServedManifest`); the last bucket carries the new ``weight_version``, so an engine reports it
   only once it has every tensor;
5. close the sessions, let the transport commit (the disk transport loads its folder here), check that
   every engine reports the new version, and resume generation.

Engines are addressed by their own URLs, never through ``sglang-router`` (it does not proxy these endpoints).
On a failure the open sessions are closed and the transport torn down; the sync is then retried whole
(``retries`` times, calling ``make_buckets`` again) or a :class:`WeightSyncError` names the engines. A
failed engine is never resumed: its generation stays paused until a later sync succeeds.

Retries re-run ``make_buckets``; when the buckets come from a Megatron export (a collective on every
trainer rank), all ranks must make the same number of attempts, so set ``retries=0`` there unless the
outcome is shared with the other ranks.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

from alp_megatron.bridge import fp8
from alp_megatron.bridge.transports import TRANSPORTS, Bucket, EngineTarget, TransportError, make_transport
from alp_megatron.errors import AlpError, ConfigError
from alp_megatron.rollout.engine_control import PAUSE_MODES, EngineControl
from alp_megatron.rollout.errors import EngineError

logger = logging.getLogger(__name__)

FP8_MODES = ("auto", "on", "off")
# What the engines compute with. native: their own dtype. fp8: a 128x128 block-FP8 checkpoint (FP8 weights and
# GEMMs; SGLang has FP8 kernels on GPUs only). fp8_rounded: their own dtype, with every linear SGLang would
# quantise rounded through e4m3 blocks and dequantised: FP8 weight rounding without FP8 activations, the
# stand-in for fp8 where no FP8 kernel runs.
ROLLOUT_PRECISIONS = ("native", "fp8", "fp8_rounded")


class WeightSyncError(AlpError):
    """A weight update did not complete on every engine; ``urls`` names the engines that failed.

    Engines that failed (and, after a partial push, the others) stay paused with their old
    ``weight_version`` label: no rollout resumes on weights that are half updated.
    """

    def __init__(self, message: str, urls: Sequence[str] = ()):
        self.urls = list(urls)
        super().__init__(message)


@dataclass(frozen=True)
class EngineSpec:
    """One SGLang engine (a worker URL, not the router's) and its tensor-parallel size."""

    url: str
    tp_size: int = 1
    api_key: Optional[str] = None


@dataclass(frozen=True)
class WeightSyncConfig:
    """How weights reach the engines.

    ``transport``: one of ``tensor``, ``distributed``, ``disk``; ``transport_options``: that transport's
    config fields. ``pause_mode``: how running requests are paused during the update (``retract`` re-queues
    them, ``abort`` returns them, ``in_place`` keeps their KV cache; None: the caller pauses and resumes).
    ``fp8``: ``auto`` quantises to 128x128 block FP8 when the served checkpoint's ``config.json`` declares
    it, leaving unquantised the modules its ``ignored_layers`` (or ``modules_to_not_convert``) name and those
    of ``fp8_ignored_layers`` (e.g. what the engines' ``SGLANG_FP8_IGNORED_LAYERS`` adds; it is not visible
    from here). ``retries``: whole-sync attempts after the first; ``retry_wait_s`` between attempts.
    ``timeout_s``: per HTTP control call. ``check_names``: check each bucket's names and shapes against the
    served checkpoint (when its folder is readable here) before sending, see :class:`ServedManifest`.
    """

    engines: Sequence[EngineSpec]
    transport: str = "tensor"
    transport_options: dict = field(default_factory=dict)
    pause_mode: Optional[str] = "retract"
    fp8: str = "auto"
    fp8_scale_format: str = "fp32"
    fp8_ignored_layers: Sequence[str] = ()
    retries: int = 1
    retry_wait_s: float = 2.0
    timeout_s: float = 600.0
    check_names: bool = True
    rollout_precision: str = "native"

    def __post_init__(self):
        engines = tuple(EngineSpec(**e) if isinstance(e, dict) else e for e in self.engines)
        object.__setattr__(self, "engines", engines)
        if not engines:
            raise ConfigError("weight_sync.engines", "no engine is listed", "list every SGLang worker URL")
        for i, engine in enumerate(engines):
            if not engine.url.startswith(("http://", "https://")):
                raise ConfigError(f"weight_sync.engines[{i}].url", f"{engine.url!r} is not an http(s) URL",
                                  "give the worker's base URL, e.g. http://10.0.0.5:30000")
            if not isinstance(engine.tp_size, int) or engine.tp_size < 1:
                raise ConfigError(f"weight_sync.engines[{i}].tp_size", f"{engine.tp_size!r} is not >= 1",
                                  "give the engine's --tp-size")
        if len({e.url.rstrip("/") for e in engines}) != len(engines):
            raise ConfigError("weight_sync.engines", "an engine URL is listed twice", "list each worker once")
        check_sync_options(self.transport, self.pause_mode, self.fp8, self.fp8_scale_format, self.retries,
                           self.rollout_precision)


def check_sync_options(transport: str, pause_mode: Optional[str], fp8_mode: str, fp8_scale_format: str,
                       retries: int, rollout_precision: str = "native") -> None:
    """The choices of a weight sync, checked where they are given (the run config) and where they are used."""
    if transport not in TRANSPORTS:
        raise ConfigError("weight_sync.transport", f"{transport!r} is not a transport", f"choose one of {TRANSPORTS}")
    if pause_mode is not None and pause_mode not in PAUSE_MODES:
        raise ConfigError("weight_sync.pause_mode", f"{pause_mode!r} is not a pause mode",
                          f"choose one of {PAUSE_MODES}, or null when the caller pauses generation")
    if fp8_mode not in FP8_MODES:
        raise ConfigError("weight_sync.fp8", f"{fp8_mode!r} is not one of {FP8_MODES}",
                          "use auto (follow the served checkpoint), on or off")
    if fp8_scale_format not in fp8.SCALE_FORMATS:
        raise ConfigError("weight_sync.fp8_scale_format", f"{fp8_scale_format!r} is not a scale format",
                          f"choose one of {fp8.SCALE_FORMATS}")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError("weight_sync.retries", f"{retries!r} is not >= 0", "give 0 or more retries")
    if rollout_precision not in ROLLOUT_PRECISIONS:
        raise ConfigError("weight_sync.rollout_precision", f"{rollout_precision!r} is not a rollout precision",
                          f"choose one of {ROLLOUT_PRECISIONS}")
    if (rollout_precision, fp8_mode) in (("fp8", "off"), ("fp8_rounded", "on")):
        raise ConfigError("weight_sync.fp8", f"{fp8_mode} contradicts weight_sync.rollout_precision="
                          f"{rollout_precision}", "leave weight_sync.fp8 at auto")


@dataclass(frozen=True)
class SyncReport:
    """What one successful sync did."""

    weight_version: str
    transport: str
    attempts: int
    buckets: int
    tensors: int
    bytes: int
    seconds: float
    fp8: bool


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """``(item, is_last)`` for each item, reading one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


class WeightSync:
    """Drives weight updates into the engines of ``config`` (see the module docstring)."""

    def __init__(self, config: WeightSyncConfig):
        self.config = config
        self.engines = [EngineTarget(EngineControl(e.url, api_key=e.api_key, timeout_s=config.timeout_s), e.tp_size)
                        for e in config.engines]
        self.transport = make_transport(config.transport, **config.transport_options)
        self._fp8: Optional[tuple] = None  # (serves FP8, module paths kept unquantised), once known
        self._tp_checked = False
        self._served_shapes: tuple = (None, {})  # (files' identity, shapes) of the served checkpoint
        self._touched = False  # whether the current attempt got past the read-only checks
        self._active = self.engines  # the engines the running sync updates

    def close(self) -> None:
        """Tear the transport down (e.g. destroy the broadcast group) and close the HTTP clients."""
        self.transport.close()
        for engine in self.engines:
            engine.control.close()

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------

    def sync(self, make_buckets: Callable[[], Iterable[Bucket]], weight_version: str,
             urls: Optional[Sequence[str]] = None) -> SyncReport:
        """Load the buckets ``make_buckets()`` yields into every engine (those of ``urls`` only, when given: e.g.
        leave out one being restarted, or update only a restarted one) and label them ``weight_version``.

        ``make_buckets`` returns the full set of HF-named tensors as buckets (called again on a retry).
        Raises :class:`WeightSyncError` when an attempt fails and no retry is left.
        """
        if not weight_version:
            raise ValueError("weight_version must be a non-empty label")
        if urls is None:
            self._active = self.engines
        else:
            wanted = {url.rstrip("/") for url in urls}
            self._active = [engine for engine in self.engines if engine.url.rstrip("/") in wanted]
            unknown = wanted - {engine.url.rstrip("/") for engine in self._active}
            if unknown or not self._active:
                raise ValueError(f"sync to {sorted(wanted)}: {sorted(unknown) or 'no engine'} is not an engine of "
                                 f"this sync ({[e.url for e in self.engines]})")
        attempts = 1 + self.config.retries
        self._touched = False
        for attempt in range(1, attempts + 1):
            try:
                report = self._attempt(make_buckets, weight_version, attempt)
            except (EngineError, TransportError, OSError) as error:
                urls = _failed_urls(error, self._active)
                self.transport.close()
                if attempt < attempts and not isinstance(error, ManifestError):
                    logger.warning("weight sync to %s failed (attempt %d of %d), retrying whole: %s",
                                   urls or "the engines", attempt, attempts, error)
                    time.sleep(self.config.retry_wait_s)
                    continue
                state = ("The engines stay paused with their old weight_version label (weights possibly half "
                         "updated); fix the cause and sync again" if self._touched else
                         "No engine was changed; fix the engine (or drop it from weight_sync.engines) and sync again")
                raise WeightSyncError(
                    f"weight update to version {weight_version!r} failed after {attempt} attempt(s) on "
                    f"{urls or [e.url for e in self._active]}: {error}. {state}", urls) from error
            except BaseException:
                # A trainer-side failure (e.g. in make_buckets): not retried; sessions are closed already
                # and the engines stay paused.
                self.transport.close()
                raise
            logger.info("weights %s loaded into %d engine(s) by %s in %.2f s (%d buckets, %.1f MiB)",
                        weight_version, len(self._active), report.transport, report.seconds, report.buckets,
                        report.bytes / 2**20)
            return report
        raise AssertionError("unreachable")

    def _attempt(self, make_buckets, weight_version: str, attempt: int) -> SyncReport:
        start = time.perf_counter()
        # /model_info, not /health: it answers while generation is paused (after a failed sync), costs no
        # generation, and a router (which does not proxy the weight endpoints) refuses it.
        infos = self._each(lambda e: e.control.model_info())
        self._check_tp_sizes()
        quantise, ignored = self._serves_fp8(infos)
        # Before generation pauses: a transport that cannot reach the engines (no group, no readable source
        # files) fails with the engines still serving their old weights.
        self.transport.connect(self._active)
        self._touched = True
        if self.config.pause_mode is not None:
            self._each(lambda e: e.control.pause_generation(self.config.pause_mode))
        # With in_place pausing the KV cache must survive the update, so the prefix cache is not flushed.
        flush = self.config.pause_mode != "in_place"
        opened: list[EngineTarget] = []
        try:
            if self.transport.requires_session:
                for engine in self._active:
                    engine.control.begin_weight_update()
                    opened.append(engine)
            buckets = tensors = nbytes = 0
            manifest = self._manifest(infos[0].get("model_path", ""))
            for bucket, last in with_last(make_buckets()):
                if quantise:
                    bucket = fp8.quantize_bucket(bucket, scale_format=self.config.fp8_scale_format, ignored=ignored)
                elif self.config.rollout_precision == "fp8_rounded":
                    bucket = fp8.round_bucket(bucket, scale_format=self.config.fp8_scale_format, ignored=ignored)
                if manifest is not None:
                    manifest.check(bucket, last)
                self.transport.push(bucket, weight_version=weight_version if last else None,
                                    flush_cache=flush and last)
                buckets += 1
                tensors += len(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if buckets == 0:
                raise TransportError("make_buckets() yielded no bucket: nothing to load")
            while opened:
                opened[0].control.end_weight_update()
                opened.pop(0)
            self.transport.commit(weight_version, flush_cache=flush)
        finally:
            for engine in opened:  # only after a failure: close what is still open, keep the first error
                try:
                    engine.control.end_weight_update()
                except EngineError as error:
                    logger.warning("could not close the weight-update session on %s: %s", engine.url, error)
        self._check_versions(weight_version)
        if self.config.pause_mode is not None:
            self._each(lambda e: e.control.continue_generation())
        return SyncReport(weight_version, self.transport.name, attempt, buckets, tensors, nbytes,
                          time.perf_counter() - start, quantise)

    # ---------------------------------------------------------------------------------------------

    def _each(self, call) -> list:
        """Run ``call(engine)`` on every engine at once and return the answers in engine order; raise the
        first failure after all have answered."""
        with ThreadPoolExecutor(max_workers=len(self._active), thread_name_prefix="weights-ctl") as pool:
            futures = [pool.submit(call, engine) for engine in self._active]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def _check_versions(self, weight_version: str) -> None:
        for engine in self._active:
            served = engine.control.weight_version()
            if served != weight_version:
                raise TransportError(f"{engine.url} reports weight_version {served!r} after the update to "
                                     f"{weight_version!r}: the last bucket was not loaded there")

    def _manifest(self, path: str) -> Optional["ServedManifest"]:
        """A fresh manifest of the checkpoint the first engine serves from ``path``; its tensor shapes are read
        once and again only when the folder's safetensors files change."""
        if not self.config.check_names:
            return None
        if not os.path.isdir(path):
            logger.info("%s serves %r, not readable here: tensor names and shapes are not checked before sending",
                        self._active[0].url, path)
            return None
        identity = (path, ServedManifest.files_identity(path))
        if self._served_shapes[0] != identity:
            self._served_shapes = (identity, ServedManifest(path).shapes)
        return ServedManifest(path, shapes=self._served_shapes[1])

    def _serves_fp8(self, infos: list[dict]) -> tuple[bool, tuple[str, ...]]:
        """Whether the engines serve FP8, and the module paths they keep unquantised (``infos``: their
        ``/model_info`` answers, in engine order); checked against ``rollout_precision``."""
        serves, ignored = self._served_format(infos)
        precision = self.config.rollout_precision
        if precision == "fp8" and not serves:
            raise ConfigError("weight_sync.rollout_precision", "is fp8, but the engines serve a checkpoint without "
                              "block-FP8 quantization_config", "serve the FP8 copy the run writes (base_model_fp8), "
                              "or one written by alp_megatron.bridge.fp8.write_fp8_checkpoint")
        if precision == "fp8_rounded" and serves:
            raise ConfigError("weight_sync.rollout_precision", "is fp8_rounded (the engine keeps its own dtype), "
                              "but the engines serve an FP8 checkpoint", "use fp8 for engines that serve FP8")
        return serves, ignored

    def _served_format(self, infos: list[dict]) -> tuple[bool, tuple[str, ...]]:
        extra = tuple(self.config.fp8_ignored_layers)
        if self.config.fp8 != "auto":
            return self.config.fp8 == "on", extra
        if self._fp8 is None:
            verdicts = {}
            for engine, info in zip(self._active, infos):
                path = info.get("model_path", "")
                if not os.path.isfile(os.path.join(path, "config.json")):
                    raise ConfigError("weight_sync.fp8", f"{engine.url} serves {path!r}, which is not readable here, "
                                      "so 'auto' cannot tell whether it serves FP8", "set it to 'on' or 'off'")
                served = fp8.served_fp8_config(path)
                verdicts[engine.url] = (served is not None, fp8.served_ignored_layers(served or {}))
            if len(set(verdicts.values())) > 1:
                raise ConfigError("weight_sync.engines", f"the engines serve different checkpoint formats (FP8, "
                                  f"layers kept unquantised): {verdicts}", "serve the same checkpoint on every engine")
            self._fp8 = next(iter(verdicts.values()))
        return self._fp8[0], self._fp8[1] + extra

    def _check_tp_sizes(self) -> None:
        """Once: every engine's tensor-parallel size is the one its :class:`EngineSpec` declares (a payload per
        TP rank, and the broadcast group's size, depend on it), and a transport that addresses engine ranks by
        TP rank alone meets no engine whose ranks that does not tell apart."""
        if self._tp_checked:
            return
        answers = self._each(lambda e: e.control.server_info())
        for i, (engine, answer) in enumerate(zip(self._active, answers)):
            served = answer.get("tp_size")  # top level of SGLang 0.5.23's /server_info
            if served is None:
                logger.warning("%s does not report its tp_size: weight_sync.engines[%d].tp_size=%d is not checked",
                               engine.url, i, engine.tp_size)
            elif served != engine.tp_size:
                raise ConfigError(f"weight_sync.engines[{i}].tp_size",
                                  f"is {engine.tp_size}, but {engine.url} runs with --tp-size {served}",
                                  f"set it to {served}")
            layout = ranks_beyond_tp(answer)
            if layout and self.transport.per_tp_rank:
                raise ConfigError("weight_sync.transport",
                                  f"the {self.transport.name} transport addresses each engine rank by its TP rank, "
                                  f"but {engine.url} runs {layout}, whose ranks share TP ranks",
                                  "serve each data-parallel replica as a server of its own (behind the router) "
                                  "without pipeline parallelism, or use weight_sync.transport=disk")
        self._tp_checked = True


def ranks_beyond_tp(server_info: dict) -> Optional[str]:
    """How an engine's ranks go beyond tensor parallelism, from its ``/server_info`` (None when they do not):
    pipeline stages, or data-parallel replicas inside one server (DP attention splits the TP ranks instead)."""
    pp_size = server_info.get("pp_size") or 1
    dp_size = server_info.get("dp_size") or 1
    if pp_size > 1:
        return f"--pp-size {pp_size}"
    if dp_size > 1 and not server_info.get("enable_dp_attention"):
        return f"--dp-size {dp_size}"
    return None


class ManifestError(TransportError):
    """The buckets do not fit the served checkpoint (unknown name, wrong shape, missing tensor): not retried."""


class ServedManifest:
    """Names and shapes of the tensors in the checkpoint the engines serve, to check buckets against.

    SGLang's ``load_weights`` silently skips a name it does not know, and its scheduler dies on a tensor of
    the wrong shape; both are caught here, on the trainer, before the bucket is sent. Before the last bucket
    the union of all names must cover the checkpoint, so a missing tensor fails the sync before the new
    ``weight_version`` is stamped.
    """

    # Buffers some checkpoints carry that no trainer exports and SGLang recomputes.
    _NOT_EXPORTED = ("rotary_emb.inv_freq",)

    def __init__(self, model_dir: str, shapes: Optional[dict[str, tuple[int, ...]]] = None):
        """``shapes``: the folder's tensor shapes when already known (else read from its safetensors headers)."""
        from safetensors import safe_open

        self.model_dir = model_dir
        if shapes is None:
            shapes = {}
            for name in sorted(os.listdir(model_dir)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(model_dir, name), "pt") as f:
                        for key in f.keys():
                            shapes[key] = tuple(f.get_slice(key).get_shape())
        self.shapes = shapes
        self.seen: set[str] = set()
        self._tied_embeddings = _ties_embeddings(model_dir)

    @staticmethod
    def files_identity(model_dir: str) -> tuple:
        """Name, size and modification time of each safetensors file: what changes when the checkpoint does."""
        entries = []
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                stat = os.stat(os.path.join(model_dir, name))
                entries.append((name, stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    def check(self, bucket: Bucket, last: bool) -> None:
        """Raise :class:`TransportError` naming any tensor of ``bucket`` the served model lacks or shapes
        differently, and (when ``last``) any served tensor no bucket carried."""
        if not self.shapes:
            return
        problems = []
        for name, tensor in bucket:
            if name not in self.shapes:
                problems.append(f"{name} is not a tensor of the served model")
            elif tuple(tensor.shape) != self.shapes[name]:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, the served model {self.shapes[name]}")
            self.seen.add(name)
        if last and not problems:
            missing = sorted(n for n in self.shapes if n not in self.seen and not self._not_exported(n))
            if missing:
                problems.append(f"{len(missing)} tensors of the served model were not exported: "
                                f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if problems:
            raise ManifestError(
                f"the buckets do not match the model served from {self.model_dir}: " + "; ".join(problems[:8])
                + ". Fix: export every tensor of the served architecture under its HF name and shape "
                "(or set weight_sync.check_names to false for a model the served folder does not describe)")

    def _not_exported(self, name: str) -> bool:
        # an lm_head saved beside tied embeddings: the model reads the embedding, SGLang skips the copy
        return name.endswith(self._NOT_EXPORTED) or (self._tied_embeddings and name == "lm_head.weight")


def _ties_embeddings(model_dir: str) -> bool:
    """Whether the served checkpoint's ``config.json`` ties the output layer to the embedding."""
    from alp_megatron.bridge.hf_folder import read_hf_config
    from alp_megatron.bridge.mapping import WeightMappingError

    try:
        config = read_hf_config(model_dir)
    except WeightMappingError:  # no readable config.json: nothing is known to be tied
        return False
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def _failed_urls(error: Exception, engines: Sequence[EngineTarget]) -> list[str]:
    """The engine URLs an error names (EngineError carries its URL; other errors are searched by text)."""
    if isinstance(error, EngineError):
        return [error.url]
    text = str(error)
    return [e.url for e in engines if e.url in text]
