"""Spawn real gloo ranks for a test: ``run_ranks(world_size, fn, *args)`` returns each rank's result.

``fn(*args)`` runs in a fresh process per rank with the torch.distributed environment set (env://); it
must be importable (a module-level function). An exception on any rank fails the call with that rank's
traceback.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be taken by
    any process's outgoing connection in the seconds before the spawned rank 0 binds it (seen as EADDRINUSE
    with the other lane of ``make test`` running beside)."""
    from alp_megatron.rollout.process import free_port as free_port_below_ephemeral

    return free_port_below_ephemeral("127.0.0.1")


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(*args))
    except BaseException:  # reported to the parent with the rank's traceback
        result = ("error", traceback.format_exc())
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as handle:
        pickle.dump(result, handle)
    os.replace(path + ".tmp", path)
    import torch.distributed as dist

    if result[0] == "ok" and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _joined(context) -> bool:
    try:
        return context.join(timeout=0.5)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        return True


def _status(out_dir: str, rank: int):
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)[0]
    except (EOFError, pickle.UnpicklingError):
        return None


def run_ranks(world_size: int, fn, *args, timeout: float = 600):
    """``fn(*args)`` on ``world_size`` spawned gloo ranks; their results in rank order. A rendezvous whose port
    was taken before rank 0 bound it (nothing ran yet) is tried again on another port, twice at most."""
    for attempt in range(3):
        try:
            return _run_ranks_once(world_size, fn, args, timeout)
        except RuntimeError as error:
            if "EADDRINUSE" not in str(error) or attempt == 2:
                raise


def _run_ranks_once(world_size: int, fn, args, timeout: float):
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not _joined(context):
            failed = [r for r in range(world_size) if _status(out_dir, r) == "error"]
            if failed or time.monotonic() > deadline:
                for process in context.processes:  # the others may wait forever in a collective
                    if process.is_alive():
                        process.kill()
                if not failed:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout} s")
                break
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {world_size} died without a result")
            with open(path, "rb") as handle:
                status, value = pickle.load(handle)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results
