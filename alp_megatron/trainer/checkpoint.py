"""Training checkpoints: Megatron dist-checkpoints of model + optimizer (``log_sigma`` included) plus the
trainer's own state (step, data position, weight version, LR schedule, RNG states).

Layout of ``<dir>/``::

    step_00000010/            a complete checkpoint (Megatron's files + trainer_state.json + rng/rank_*.pt)
    step_00000020.partial/    a save in progress (or one that crashed): never loaded, removed by the next save
    latest                    the name of the newest complete checkpoint, replaced atomically

A checkpoint is written into ``*.partial`` and renamed only when every rank has finished, and ``latest`` is
switched after the rename, so a crash at any point leaves the previous ``latest`` loadable. Any TP/PP layout
can load any other's checkpoint (Megatron reshards). Every rank calls save/load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from alp_megatron.atomic_files import write_text_atomically
from alp_megatron.errors import AlpError, ConfigError

logger = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
PARTIAL = ".partial"
# torch's Adam fallback keeps a per-parameter "step" that Megatron's fully reshardable format cannot load.
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass(frozen=True)
class CheckpointConfig:
    """``save_every``: steps between saves (0: only at the end). ``keep_last``: complete checkpoints kept."""

    save_every: int = 0
    keep_last: int = 2

    def __post_init__(self):
        if self.save_every < 0:
            raise ConfigError("checkpoint.save_every", f"must be >= 0, got {self.save_every}",
                              "use 0 to save only at the end, or N to save every N steps")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last", f"must be >= 1, got {self.keep_last}",
                              "keep at least the latest checkpoint")


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands, saved in every checkpoint beside the weights, the optimizer and the RNG states.

    ``next_step``: the RL step a resumed run starts with. ``weight_version``: the version the engines hold.
    ``optimizer_steps``: optimizer steps taken so far; they key the ALP noise (``NoiseSource``), so a resumed
    run draws the noise the uninterrupted one would have. ``data_position`` (``DataPosition.to_dict``) and
    ``next_group_id``: the rollout side's position (``Synchronous.resume_state``), so a resumed run trains
    on the prompts and group ids the uninterrupted one would have. Written by :meth:`after_step` in the
    loop, read back and applied by :meth:`from_state` and :meth:`restore` when a run resumes.
    """

    next_step: int = 0
    weight_version: int = 0
    optimizer_steps: int = 0
    data_position: Optional[dict] = None
    next_group_id: int = 0

    @classmethod
    def after_step(cls, step: int, weight_version: int, actor, rollout_state: dict) -> "RunProgress":
        """The progress after RL step ``step`` (0-based) of a run whose ``actor`` trained it."""
        return cls(next_step=step + 1, weight_version=weight_version, optimizer_steps=actor.optimizer_steps,
                   data_position=rollout_state.get("data_position"),
                   next_group_id=rollout_state.get("next_group_id", 0))

    @classmethod
    def from_state(cls, trainer_state: dict) -> "RunProgress":
        """The progress in a trainer state that :func:`load_checkpoint` returned."""
        return cls(**{name: trainer_state[name] for name in asdict(cls()) if name in trainer_state})

    def to_state(self) -> dict:
        return asdict(self)

    def restore(self, actor, prompt_batches=None) -> None:
        """Continue ``actor``'s optimizer-step count and (global rank 0) ``prompt_batches``' position."""
        from alp_megatron.data.batches import DataPosition

        actor.optimizer_steps = self.optimizer_steps
        if prompt_batches is not None and self.data_position:
            prompt_batches.restore(DataPosition.from_dict(self.data_position))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _model_sharded_state(ddp_chunks: list) -> dict:
    # DDP's own sharded_state_dict adds a "module." prefix that its load_state_dict does not expect.
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(ddp_chunks)}


def rng_state() -> dict:
    """This rank's RNG states. The ALP noise and SGLang's sampling are seeded by their own keys, so on the
    default config (no dropout) nothing reads them; with dropout on (``model.megatron.extra``
    ``hidden_dropout`` / ``attention_dropout``) the masks come from the torch and tracker states, and a resume
    repeats them only with these restored (tests/trainer/test_checkpoint.py resumes with dropout on)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(directory: str, step: int, ddp_chunks: list, optimizer, scheduler,
                    trainer_state: dict, config: CheckpointConfig = CheckpointConfig()) -> str:
    """Save step ``step``; ``trainer_state`` is a JSON-serialisable dict (data position, weight version...).

    Returns the checkpoint's path. Collective: every rank calls it with the same arguments.
    """
    from megatron.core import dist_checkpointing

    started = time.monotonic()
    final = os.path.join(directory, checkpoint_name(step))
    partial = final + PARTIAL
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):  # leftovers of a crashed save
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()

    sharded = _model_sharded_state(ddp_chunks)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_DIST_OPT_METADATA)
    dist_checkpointing.save(sharded, partial)
    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                 **trainer_state}
        _write_json_atomically(os.path.join(partial, TRAINER_STATE), state)
    dist.barrier()

    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomically(os.path.join(directory, LATEST), checkpoint_name(step))
        _prune(directory, config.keep_last)
        logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
    dist.barrier()
    return final


def _prune(directory: str, keep_last: int) -> None:
    complete = sorted(name for name in os.listdir(directory)
                      if name.startswith("step_") and not name.endswith(PARTIAL))
    for name in complete[:-keep_last]:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE)) and os.path.isfile(os.path.join(path, "metadata.json"))


def find_latest_checkpoint(directory: str) -> Optional[str]:
    """The newest complete checkpoint in ``directory`` (``latest`` first), or None if there is none."""
    if not os.path.isdir(directory):
        return None
    pointer = os.path.join(directory, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as handle:
            candidate = os.path.join(directory, handle.read().strip())
        if _is_complete(candidate):
            return candidate
        logger.warning("%s names %s, which is not a complete checkpoint; using the newest complete one",
                       pointer, candidate)
    complete = sorted(name for name in os.listdir(directory)
                      if name.startswith("step_") and not name.endswith(PARTIAL)
                      and _is_complete(os.path.join(directory, name)))
    return os.path.join(directory, complete[-1]) if complete else None


def load_checkpoint(path: str, ddp_chunks: list, optimizer, scheduler) -> dict:
    """Load model, optimizer, scheduler and RNG states from ``path``; return the trainer state dict.

    The RNG states are restored per rank when the world size is the one that saved; otherwise (a resharded
    resume) the RNG is left as seeded and a warning says so.
    """
    from megatron.core import dist_checkpointing

    if not _is_complete(path):
        raise AlpError(f"checkpoint {path} is incomplete or missing (no {TRAINER_STATE} / metadata.json); "
                       "resume from another one or start without --resume")
    sharded = _model_sharded_state(ddp_chunks)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=_DIST_OPT_METADATA)
    state = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(ddp_chunks):
        chunk.module.load_state_dict(state[f"model{i}"])
    with torch.no_grad():  # the fp32 distributed optimizer copies into leaf views
        optimizer.load_state_dict(state["optimizer"])
    with open(os.path.join(path, TRAINER_STATE)) as handle:
        trainer_state = json.load(handle)
    scheduler.num_steps = 0  # Megatron's load_state_dict advances from the current count, not to the saved one
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if trainer_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        restore_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("checkpoint %s was saved by %s ranks, this run has %d: RNG states not restored",
                       path, trainer_state.get("world_size"), dist.get_world_size())
    return trainer_state


def _write_json_atomically(path: str, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=1, sort_keys=True))
