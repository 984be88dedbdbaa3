"""Hugging Face folders: read an HF config, and write the Megatron model as a folder ``transformers`` loads.

The folder is written by rank 0 only, into a temporary sibling folder renamed into place at the end, so
``out_dir`` either does not exist or is complete. Weights go to ``model.safetensors``, or to
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` when larger than one shard.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Any, Callable, Optional, Sequence

import torch

from alp_megatron.bridge.export import export_hf_buckets
from alp_megatron.bridge.mapping import WeightMappingError
from alp_megatron.model.arch import ModelArch

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_SHARD_BYTES = 2 << 30  # rank 0 holds one shard in memory while writing it
DEFAULT_BUCKET_BYTES = 256 << 20


def read_hf_config(folder: str) -> dict:
    """The ``config.json`` of an HF folder, as a dict; raises naming the file and the fix."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise WeightMappingError(path, "the file does not exist",
                                 "pass the folder of an HF checkpoint (it holds config.json)")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise WeightMappingError(path, f"unreadable ({error})", "restore a valid config.json") from error


def arch_from_hf_folder(folder: str) -> ModelArch:
    """The architecture described by ``folder/config.json`` (raises ConfigError when unsupported)."""
    return ModelArch.from_hf_config(read_hf_config(folder))


def side_files(folder: str) -> list[str]:
    """Top-level files of an HF folder other than weights: config, generation config, tokenizer files."""
    return sorted(
        name for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
        and not name.endswith(WEIGHT_SUFFIXES) and name not in WEIGHT_INDEXES
    )


def copy_side_files(source: str, target: str, include_config: bool = True) -> None:
    """Copy :func:`side_files` of ``source`` into ``target`` byte for byte."""
    for name in side_files(source):
        if include_config or name != CONFIG_FILE:
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


def save_hf_folder(
    model_chunks: Sequence[torch.nn.Module],
    hf_config: Any,
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Write the model as an HF folder at ``out_dir``: safetensors weights, ``config.json`` and the tokenizer.

    ``hf_config``: an HF folder (its ``config.json`` and ``generation_config.json`` are copied byte for
    byte), a ``config.json`` dict, or a ``transformers`` config object. ``tokenizer_dir``: a folder whose
    non-weight files (tokenizer, chat template) are copied too. Every rank of the model calls this (the
    weights are gathered with :func:`export_hf_buckets`); rank 0 writes. ``out_dir`` must not exist or be
    empty unless ``overwrite``. Raises the same error on every rank. ``progress(done_bytes, total_bytes)``:
    called as the weights are gathered (see :func:`export_hf_buckets`).
    """
    config = _config_dict(hf_config)
    arch = ModelArch.from_hf_config(config)
    writer, problem = None, None
    if is_rank0():
        problem = output_folder_problem(out_dir, overwrite)
        if problem is None:
            try:
                writer = _ShardWriter(new_staging_folder(out_dir), max_shard_bytes)
            except OSError as error:
                problem = FolderProblem(out_dir, f"cannot create a folder beside it ({error})",
                                   "check the parent folder's permissions")
        if writer is not None:
            try:
                _write_config(hf_config, config, writer.folder)
                if tokenizer_dir is not None:
                    copy_side_files(tokenizer_dir, writer.folder, include_config=False)
            except Exception as error:  # noqa: BLE001 - every rank must still run the export's collectives
                writer.fail(error)
    problem = broadcast_from_rank0([problem and problem.args])[0]
    if problem is not None:
        raise WeightMappingError(*problem)
    try:
        for bucket in export_hf_buckets(model_chunks, arch, bucket_bytes, dtype, progress):
            if writer is not None:
                writer.add(bucket)
            del bucket
        failure = None
        if writer is not None:
            failure = writer.finish()
            if failure is None:
                try:
                    publish_folder(writer.folder, out_dir, overwrite)
                    writer = None
                except OSError as error:
                    failure = f"{type(error).__name__}: {error}"
        failure = broadcast_from_rank0([failure])[0]  # also holds every rank until the folder is in place
        if failure is not None:
            raise WeightMappingError(out_dir, f"writing the folder failed on rank 0 ({failure})",
                                     "check free space and permissions of the output folder's parent")
    finally:
        if writer is not None:
            shutil.rmtree(writer.folder, ignore_errors=True)


class _ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (one larger tensor alone)."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self.error: Optional[str] = None

    def fail(self, error: Exception) -> None:
        self.error = self.error or f"{type(error).__name__}: {error}"

    def add(self, bucket) -> None:
        if self.error:
            return
        try:
            for name, tensor in bucket:
                nbytes = tensor.numel() * tensor.element_size()
                if self.current and self.current_bytes + nbytes > self.max_bytes:
                    self._flush()
                self.current[name] = _own_storage(tensor)
                self.current_bytes += nbytes
                self.total_bytes += nbytes
        except Exception as error:  # noqa: BLE001 - reported after the export's collectives finish
            self.fail(error)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, self._shard_path(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _shard_path(self, index: int) -> str:
        return os.path.join(self.folder, f".shard-{index:05d}.safetensors")

    def finish(self) -> Optional[str]:
        """Name the shards, write the index; returns the first error, if any."""
        try:
            if not self.error:
                if self.current or not self.shards:
                    self._flush()
                count = len(self.shards)
                if count == 1:
                    os.rename(self._shard_path(0), os.path.join(self.folder, "model.safetensors"))
                else:
                    weight_map = {}
                    for index, names in enumerate(self.shards):
                        file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
                        os.rename(self._shard_path(index), os.path.join(self.folder, file))
                        weight_map.update({name: file for name in names})
                    index = {"metadata": {"total_size": self.total_bytes},
                             "weight_map": dict(sorted(weight_map.items()))}
                    with open(os.path.join(self.folder, WEIGHT_INDEXES[0]), "w") as handle:
                        json.dump(index, handle, indent=2)
                        handle.write("\n")
        except Exception as error:  # noqa: BLE001
            self.fail(error)
        return self.error


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with memory of its own: safetensors refuses tensors sharing memory, and the export may
    hand out views (of parameters or of one gathered buffer)."""
    tensor = tensor.cpu()
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor.contiguous() if whole else tensor.clone(memory_format=torch.contiguous_format)


def _config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, (str, os.PathLike)):
        return read_hf_config(str(hf_config))
    if isinstance(hf_config, dict):
        return hf_config
    return hf_config.to_dict()


def _write_config(hf_config: Any, config: dict, folder: str) -> None:
    if isinstance(hf_config, (str, os.PathLike)):
        for name in (CONFIG_FILE, "generation_config.json"):
            if os.path.isfile(os.path.join(hf_config, name)):
                shutil.copyfile(os.path.join(hf_config, name), os.path.join(folder, name))
    elif isinstance(hf_config, dict):
        with open(os.path.join(folder, CONFIG_FILE), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
    else:
        hf_config.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# Atomic output folders (also used for Megatron checkpoints).


class FolderProblem:
    """An output-folder problem as plain data (``args`` of a WeightMappingError), safe to broadcast."""

    def __init__(self, where: str, problem: str, fix: str):
        self.args = (where, problem, fix)


def output_folder_problem(out_dir: str, overwrite: bool = False) -> Optional[FolderProblem]:
    """Why ``out_dir`` cannot be written, or None: its parent must be a writable folder, and ``out_dir`` must
    not exist or be empty (any folder with ``overwrite``)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return FolderProblem(out_dir, f"the parent folder {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        return FolderProblem(out_dir, f"the parent folder {parent} is not writable", "choose a writable location")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return FolderProblem(out_dir, "exists and is a file", "choose a new output folder")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        return FolderProblem(out_dir, "already exists and is not empty",
                             "choose a new output folder, or remove this one")
    return None


def new_staging_folder(out_dir: str) -> str:
    """An empty hidden folder beside ``out_dir`` (same file system, so it can be renamed into place)."""
    out_dir = os.path.abspath(out_dir)
    path = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial-{secrets.token_hex(4)}")
    os.mkdir(path)
    return path


def publish_folder(staging: str, out_dir: str, overwrite: bool = False) -> None:
    """Rename the finished ``staging`` folder to ``out_dir`` (replacing an empty one, or any with ``overwrite``)."""
    old = None
    if os.path.exists(out_dir):
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        elif overwrite:
            old = new_staging_folder(out_dir)
            os.rmdir(old)
            os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_rank0(values: list) -> list:
    """``values`` of rank 0 on every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values
