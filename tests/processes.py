"""Processes of a run, found and killed by process id (Linux /proc): what the tests use to check that a run
leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])  # state, ppid


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(root: int) -> set[int]:
    """Every running process below ``root`` in the parent tree, ``root`` included."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] != "Z":
                parents[int(entry)] = stat[1]
    found, frontier = {root} if root in parents else set(), [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


def kill_tree(root: int) -> set[int]:
    """SIGKILL ``root`` and every process below it at once: the tree is frozen (SIGSTOP) until no new process
    appears, so none of it can react or start another. Returns the pids killed."""
    frozen: set[int] = set()
    while True:
        tree = descendants(root) - frozen
        if not tree:
            break
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        frozen |= tree
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return frozen


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every pid to stop running; returns those still running."""
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(pid for pid in pids if running(pid))
