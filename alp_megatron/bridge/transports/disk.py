"""The ``disk`` transport: a safetensors folder per update, loaded with ``/update_weights_from_disk``.

Each bucket becomes one shard of a fresh folder under ``root``; at :meth:`DiskTransport.commit` the index
and every non-weight file of the served model's folder (``config.json``, tokenizer, generation config)
are added, so SGLang can load the folder like any HF checkpoint, and every engine is asked to load it.
The folder is staged under a ``.partial`` name and renamed once complete, so an engine never reads half
a checkpoint. Older folders this transport wrote are removed after a successful load (``keep`` newest
are kept). ``root`` must be readable by every engine (local disk for local engines, else a shared
file system). Needs no weight-update session.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from alp_megatron.bridge.transports import Bucket, EngineTarget, TransportError
from alp_megatron.errors import ConfigError
from alp_megatron.rollout.errors import EngineError

logger = logging.getLogger(__name__)

_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|\.bin\.index\.json)$")
_FOLDER = re.compile(r"^weights-(\d{6})-")
_PARTIAL = re.compile(r"^\.partial-(\d{6})$")


@dataclass(frozen=True)
class DiskTransportConfig:
    """``root``: where update folders go (None: a new temporary folder, for engines on this host, removed with
    the transport, at the latest when the process exits; engines keep the weights they loaded).
    ``source_dir``: the served model's HF folder whose config and tokenizer files are copied (None: the
    ``model_path`` the first engine reports). ``keep``: how many update folders to keep (the newest)."""

    root: Optional[str] = None
    source_dir: Optional[str] = None
    keep: int = 1

    def __post_init__(self):
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ConfigError("weight_sync.disk.keep", f"{self.keep!r} is not >= 1",
                              "keep at least the folder the engines serve now")
        if self.source_dir is not None and not os.path.isfile(os.path.join(self.source_dir, "config.json")):
            raise ConfigError("weight_sync.disk.source_dir", f"{self.source_dir!r} has no config.json",
                              "point it at the HF folder the engines were started from")


def non_weight_files(folder: str) -> list[str]:
    """The files of an HF model folder other than weights and weight indexes (config, tokenizer, ...)."""
    return sorted(name for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name)) and not _WEIGHT_FILE.search(name))


class DiskTransport:
    """Safetensors folders under ``config.root``, loaded by every engine from its path."""

    name = "disk"
    requires_session = False
    per_tp_rank = False

    def __init__(self, config: DiskTransportConfig = DiskTransportConfig()):
        self.config = config
        self.root = config.root or tempfile.mkdtemp(prefix="alp-weights-")
        os.makedirs(self.root, exist_ok=True)
        if config.root is None:  # a temporary folder of ours, with a model copy in it: gone with this transport
            weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)
        self.source_dir = config.source_dir
        self._engines: list[EngineTarget] = []
        self._staging: Optional[str] = None
        self._weight_map: dict[str, str] = {}
        self._remove_unfinished()
        self._sequence = self._last_sequence()

    @property
    def current(self) -> Optional[str]:
        """The newest complete folder this transport wrote, or None."""
        folders = self._folders()
        return folders[-1] if folders else None

    def connect(self, engines: Sequence[EngineTarget]) -> None:
        self._engines = list(engines)
        if self.source_dir is None:
            served = engines[0].control.model_info().get("model_path", "")
            if not os.path.isfile(os.path.join(served, "config.json")):
                raise ConfigError("weight_sync.disk.source_dir",
                                  f"{engines[0].url} serves {served!r}, which is not a folder readable here",
                                  "set it to a local copy of the HF folder the engines were started from")
            self.source_dir = served
        self._discard_staging()
        self._sequence += 1
        self._staging = os.path.join(self.root, f".partial-{self._sequence:06d}")
        os.makedirs(self._staging)
        self._weight_map = {}

    def push(self, bucket: Bucket, weight_version: Optional[str] = None, flush_cache: bool = False) -> None:
        from safetensors.torch import save_file

        if self._staging is None:
            raise TransportError("disk transport: push() before connect(engines)")
        shard = f"model-{len(set(self._weight_map.values())) + 1:05d}.safetensors"
        for name, _ in bucket:
            if name in self._weight_map:
                raise TransportError(f"disk transport: tensor {name} is in two buckets ({self._weight_map[name]} "
                                     f"and {shard}); each HF tensor must be exported once per update")
            self._weight_map[name] = shard
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in bucket}
        save_file(tensors, os.path.join(self._staging, shard), metadata={"format": "pt"})

    def commit(self, weight_version: str, flush_cache: bool = True) -> None:
        if self._staging is None or not self._weight_map:
            raise TransportError("disk transport: commit() without any pushed bucket")
        for name in non_weight_files(self.source_dir):
            shutil.copy2(os.path.join(self.source_dir, name), os.path.join(self._staging, name))
        sizes = sum(os.path.getsize(os.path.join(self._staging, f)) for f in set(self._weight_map.values()))
        with open(os.path.join(self._staging, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sizes}, "weight_map": self._weight_map}, f, indent=1)
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", weight_version)[:64]
        folder = os.path.join(self.root, f"weights-{self._sequence:06d}-{label}")
        os.rename(self._staging, folder)
        self._staging = None
        self._load(folder, weight_version, flush_cache)
        self._remove_old()

    def close(self) -> None:
        self._discard_staging()
        self._engines = []

    # ---------------------------------------------------------------------------------------------

    def _load(self, folder: str, weight_version: str, flush_cache: bool) -> None:
        def load(engine: EngineTarget) -> None:
            engine.control.update_weights_from_disk(folder, weight_version=weight_version, flush_cache=flush_cache)

        with ThreadPoolExecutor(max_workers=len(self._engines), thread_name_prefix="weights-disk") as pool:
            futures = [pool.submit(load, engine) for engine in self._engines]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if len(errors) == 1 and isinstance(errors[0], EngineError):
            raise errors[0]
        if errors:
            raise TransportError(f"disk transport: {len(errors)} engines could not load {folder}: "
                                 + "; ".join(str(e) for e in errors))

    def _folders(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.root) if _FOLDER.match(n))
        return [os.path.join(self.root, n) for n in names]

    def _last_sequence(self) -> int:
        numbers = [int(_FOLDER.match(os.path.basename(f)).group(1)) for f in self._folders()]
        return max(numbers, default=0)

    def _remove_unfinished(self) -> None:
        """Folders of updates a crash left unfinished (a later update would take their names)."""
        for name in os.listdir(self.root):
            if _PARTIAL.match(name):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                logger.info("removed the unfinished update folder %s", os.path.join(self.root, name))

    def _remove_old(self) -> None:
        for folder in self._folders()[:-self.config.keep]:
            if os.path.abspath(folder) == os.path.abspath(self.source_dir):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed old weight folder %s", folder)

    def _discard_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
