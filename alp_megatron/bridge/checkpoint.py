"""Megatron dist-checkpoints of the model weights, as the converter writes and reads them.

The weights are saved with ``megatron.core.dist_checkpointing`` from the model's ``sharded_state_dict``,
so any other TP/PP/EP layout can load them (Megatron reshards on load). Beside them, in ``hf/``, lie the
HF ``config.json`` and tokenizer files of the model, from which the architecture is read back. Only model
weights are stored (no ``log_sigma``, no optimizer state). Layout: ``ckpt/{metadata.json, common.pt,
*.distcp, hf/config.json, hf/tokenizer*...}``.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import torch

from alp_megatron.bridge.hf_folder import (
    FolderProblem, broadcast_from_rank0, copy_side_files, is_rank0, new_staging_folder, output_folder_problem,
    publish_folder, read_hf_config,
)
from alp_megatron.bridge.hf_import import agree_on_problems, problem_of
from alp_megatron.bridge.mapping import NOT_MODEL_WEIGHTS, WeightMappingError

HF_SUBFOLDER = "hf"
METADATA_FILE = "metadata.json"


def checkpoint_hf_folder(ckpt_dir: str) -> str:
    """The ``hf/`` folder of a converter checkpoint (its ``config.json`` checked); raises naming the fix."""
    if not os.path.isfile(os.path.join(ckpt_dir, METADATA_FILE)):
        raise WeightMappingError(
            ckpt_dir, f"no {METADATA_FILE}: not a Megatron dist-checkpoint",
            "pass a folder written by `alp-convert hf-to-mcore` (or megatron.core.dist_checkpointing.save)",
        )
    folder = os.path.join(ckpt_dir, HF_SUBFOLDER)
    read_hf_config(folder)
    return folder


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """The chunks' sharded state dicts, keyed ``model`` (one chunk) or ``model0``, ``model1``... (virtual
    stages), as Megatron-LM does, without :data:`NOT_MODEL_WEIGHTS`."""
    def weights_only(chunk):
        return {k: v for k, v in chunk.sharded_state_dict().items() if not _is_not_model_weight(k)}

    if len(model_chunks) == 1:
        return {"model": weights_only(model_chunks[0])}
    return {f"model{i}": weights_only(chunk) for i, chunk in enumerate(model_chunks)}


def save_megatron_checkpoint(model_chunks: Sequence[torch.nn.Module], ckpt_dir: str, hf_dir: str) -> None:
    """Save the weights of this rank's chunks to ``ckpt_dir``, with ``hf_dir``'s config and tokenizer files.

    Every rank calls this. Written into a temporary folder beside ``ckpt_dir`` that rank 0 renames into
    place at the end, so ``ckpt_dir`` is absent or complete. ``ckpt_dir`` must not exist or be empty.
    """
    from megatron.core import dist_checkpointing

    problem, staging = None, None
    if is_rank0():
        problem = output_folder_problem(ckpt_dir)
        if problem is None:
            try:
                staging = new_staging_folder(ckpt_dir)
            except OSError as error:
                problem = FolderProblem(ckpt_dir, f"cannot create a folder beside it ({error})",
                                   "check the parent folder's permissions")
    problem, staging = broadcast_from_rank0([problem and problem.args, staging])
    if problem is not None:
        raise WeightMappingError(*problem)
    try:
        dist_checkpointing.save(model_sharded_state_dict(model_chunks), staging)
        failure = None
        if is_rank0():
            try:
                os.mkdir(os.path.join(staging, HF_SUBFOLDER))
                copy_side_files(hf_dir, os.path.join(staging, HF_SUBFOLDER))
                publish_folder(staging, ckpt_dir)
                staging = None
            except OSError as error:
                failure = f"{type(error).__name__}: {error}"
        failure = broadcast_from_rank0([failure])[0]
        if failure is not None:
            raise WeightMappingError(ckpt_dir, f"writing the checkpoint failed on rank 0 ({failure})",
                                     "check free space and permissions of the output folder's parent")
    finally:
        if staging is not None and is_rank0():
            shutil.rmtree(staging, ignore_errors=True)


def load_megatron_checkpoint(model_chunks: Sequence[torch.nn.Module], ckpt_dir: str) -> None:
    """Load the weights in ``ckpt_dir`` into this rank's chunks (any layout). Every rank calls this.

    Tensors missing from the checkpoint or of another shape are reported by one error on every rank before
    any weight changes. Non-weight parameters (``log_sigma``) keep their values.
    """
    from megatron.core import dist_checkpointing

    sharded = model_sharded_state_dict(model_chunks)
    fix = "load it into a model built from its own hf/config.json"
    try:
        checkpoint_hf_folder(ckpt_dir)
        metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
        problems = [(problem, fix) for problem in _fit_problems(sharded, metadata)]
    except Exception as error:  # noqa: BLE001 - agreed below, so no rank waits alone in a collective
        problems = [problem_of(error)]
    problems = agree_on_problems(problems)
    if problems:
        raise WeightMappingError(
            ckpt_dir, "the checkpoint does not fit the model: " + "; ".join(problem for problem, _ in problems),
            "; ".join(dict.fromkeys(f for _, f in problems)) + "; nothing was loaded",
        )
    state = dist_checkpointing.load(sharded, ckpt_dir)
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for key, chunk in zip(keys, model_chunks):
        result = chunk.load_state_dict(state[key], strict=False)
        missing = [k for k in result.missing_keys if not _is_not_model_weight(k) and not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise WeightMappingError(ckpt_dir, f"loaded state lacks {missing}, has unexpected "
                                     f"{result.unexpected_keys}", "report this: the sharded state dict and the "
                                     "module disagree")


def _fit_problems(sharded: dict, metadata: dict) -> list[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    problems = []
    for value in nested_values(sharded):
        if isinstance(value, ShardedObject):
            continue
        key = getattr(value, "key", None)
        if key is None:
            continue
        stored = metadata.get(key)
        if stored is None:
            problems.append(f"tensor {key} is not in the checkpoint")
        elif (isinstance(value, ShardedTensor) and not value.allow_shape_mismatch
              and tuple(stored.global_shape) != tuple(value.global_shape)):
            problems.append(f"{key} is {list(stored.global_shape)} in the checkpoint, the model needs "
                            f"{list(value.global_shape)}")
    return problems


def _is_not_model_weight(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in NOT_MODEL_WEIGHTS)
