"""Load a Hugging Face safetensors checkpoint into this rank's Megatron model chunks (any TP/PP/EP/VPP).

Each rank reads only the tensors, and of those only the rows or columns, its own parameters need
(``safe_open`` slices, one key at a time). Everything is checked before any weight changes: tensors the
model needs but the folder lacks, tensors the folder holds but the model has no place for, and tensors
whose shape does not fit. The problems of all ranks are gathered, so every rank raises the same single
error instead of one rank raising while the others wait in a collective.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch

from alp_megatron.bridge.mapping import (
    Binding, ParallelRanks, WeightMappingError, bind_parameters, hf_tensor_names, is_ignored_hf_name,
)
from alp_megatron.model.arch import ModelArch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFWeights:
    """The tensors of an HF folder: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.

    Opening reads the index only; each file is opened (header parsed, memory-mapped) the first time one of
    its tensors is asked for. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.files = weight_map(folder)  # tensor name -> file name
        self._open: dict = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get_slice(self, name: str):
        """A lazily read view of tensor ``name``: index it (``[a:b]``, ``[:, a:b]``) to read those values."""
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.folder, file), framework="pt")
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self.get_slice(name).get_shape())

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_map(folder: str) -> dict[str, str]:
    """``{tensor name: file name}`` of an HF folder; raises naming the missing file and the fix."""
    if not os.path.isdir(folder):
        raise WeightMappingError(folder, "the folder does not exist", "pass the folder of an HF checkpoint")
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as handle:
                mapping = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise WeightMappingError(index, f"unreadable index ({error})",
                                     "re-save the checkpoint (save_pretrained writes a valid index)") from error
        absent = sorted({f for f in mapping.values() if not os.path.exists(os.path.join(folder, f))})
        if absent:
            raise WeightMappingError(index, f"lists files that are missing: {', '.join(absent)}",
                                     "copy the complete checkpoint (every shard of the index)")
        return dict(mapping)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    other = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {', '.join(other)}: convert them to safetensors)" if other else ""
    raise WeightMappingError(
        folder, f"neither {SINGLE_FILE} nor {INDEX_FILE} is there{hint}",
        "save the model with save_pretrained(..., safe_serialization=True)",
    )


def load_hf_weights(model_chunks: Sequence[torch.nn.Module], hf_dir: str, arch: ModelArch,
                    progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Copy the HF checkpoint in ``hf_dir`` into this rank's ``model_chunks`` (unwrapped ``GPTModel``s).

    Every rank of the model calls this (it ends with one all-gather of the problems found). Raises one
    :class:`WeightMappingError`, on every rank, listing all missing, unexpected and mis-shaped tensors,
    before any weight is changed. Non-weight parameters (``log_sigma``) are left as they are.
    ``progress(loaded_bytes, total_bytes)``: called after each parameter is filled, with this rank's bytes.
    """
    ranks = ParallelRanks.current()
    fix = "use the weights that belong to this config.json (same sizes, complete set of shards)"
    problems, bindings, weights = [], [], None
    try:
        weights = HFWeights(hf_dir)
        bindings = bind_parameters(model_chunks, arch, ranks)
        problems = [(problem, fix) for problem in _problems(weights, bindings, arch, ranks)]
    except Exception as error:  # noqa: BLE001 - reported to every rank below, so no rank waits alone
        problems = [problem_of(error)]
    problems = agree_on_problems(problems)
    if problems:
        if weights is not None:
            weights.close()
        raise WeightMappingError(
            hf_dir, f"the checkpoint does not fit the {arch.architecture} model: "
            + "; ".join(problem for problem, _ in problems),
            "; ".join(dict.fromkeys(f for _, f in problems)) + "; nothing was loaded",
        )
    sizes = [b.param.numel() * b.param.element_size() for b in bindings]
    total, loaded = sum(sizes), 0
    with weights, torch.no_grad():
        for binding, size in zip(bindings, sizes):
            binding.param.copy_(_local_shard(weights, binding, arch, ranks))
            loaded += size
            if progress is not None:
                progress(loaded, total)


def _problems(weights: HFWeights, bindings: list[Binding], arch: ModelArch, ranks: ParallelRanks) -> list[str]:
    present = set(weights.names())
    expected = hf_tensor_names(arch)
    problems = []
    missing = [n for n in expected if n not in present]
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    known = set(expected)
    unexpected = sorted(n for n in present if n not in known and not is_ignored_hf_name(arch, n))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    misshaped = []
    for binding in bindings:
        names = binding.hf_names()
        if any(n not in present for n in names):
            continue
        wanted = binding.hf_shapes(arch, ranks)
        bad = [(n, weights.shape(n), tuple(w)) for n, w in zip(names, wanted) if weights.shape(n) != tuple(w)]
        misshaped += [f"{n} is {list(have)} in {weights.files[n]}, the model needs {list(want)}"
                      for n, have, want in bad]
        if not bad:  # the shard the layout would build, computed on meta tensors (no data read)
            meta = [torch.empty(shape, device="meta") for shape in wanted]
            local = binding.layout.load(meta, binding.shard(ranks), arch)
            if local.shape != binding.param.shape:
                misshaped.append(f"{binding.name}: the shard built from {', '.join(names)} is "
                                 f"{list(local.shape)}, the parameter is {list(binding.param.shape)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    return problems


def _local_shard(weights: HFWeights, binding: Binding, arch: ModelArch, ranks: ParallelRanks) -> torch.Tensor:
    sources = [weights.get_slice(name) for name in binding.hf_names()]
    local = binding.layout.load(sources, binding.shard(ranks), arch)
    if local.shape != binding.param.shape:  # the shape checks above make this unreachable; kept as a guard
        raise WeightMappingError(binding.name, f"built a shard of {list(local.shape)} for a parameter of "
                                 f"{list(binding.param.shape)}", "report this mapping bug")
    return local


def problem_of(error: Exception) -> tuple[str, str]:
    """``(problem, fix)`` of an exception met while checking, for :func:`agree_on_problems`."""
    if isinstance(error, WeightMappingError):
        return f"{error.where}: {error.problem}", error.fix
    return f"{type(error).__name__}: {error}", "report this error"


def agree_on_problems(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ``(problem, fix)`` pairs of all ranks, the same list on every rank (duplicates removed, order
    kept). Every rank calls this (one object all-gather over the world)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Optional[list]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problems)
        problems = [p for rank_problems in everyone for p in rank_problems]
    return list(dict.fromkeys(problems))
