"""Launched process groups end with the process that launched them, however it ends.

Every :class:`~alp_megatron.rollout.process.ManagedProcess` runs in a session of its own, so nothing of its
launcher's death reaches it: a trainer rank killed by SIGKILL or by the OOM killer would leave its SGLang
servers running, holding their GPUs. So a launching process starts one reaper
(``python -m alp_megatron.rollout.reaper LAUNCHER_PID``) before its first launch and tells it, through the
reaper's standard input, each group it starts (with how that group is stopped) and each it has stopped.

The reaper learns of the launcher's death from the end of that pipe (the kernel closes the launcher's end
however it dies; no pid is polled that could have been reused), and, should a forked child of the launcher
still hold the pipe open, from its own parent changing. It then stops every group still recorded as
:meth:`ManagedProcess.stop` would (the same :func:`~alp_megatron.rollout.process.stop_group`, and the shared
memory files it would unlink) and exits. It leads a session of its own and ignores SIGINT and SIGHUP, so a
Ctrl-C or a hang-up that reaches the launcher's process group, or a signal to that group, does not end it
before the launcher.

Not covered: a launcher killed in the microseconds between a group's fork and its record here.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

_MODULE = "alp_megatron.rollout.reaper"

_lock = threading.Lock()
_reaper: Optional[subprocess.Popen] = None
_watched: dict[int, str] = {}  # group -> its watch line, sent again to a reaper started anew


def watch(group: int, leader_stop_signal: Optional[int], shared_memory_prefixes: Sequence[str]) -> None:
    """Record a group this process has just launched (started by ``ManagedProcess.start``)."""
    line = json.dumps({"watch": group, "leader_stop_signal": int(leader_stop_signal or 0),
                       "shared_memory_prefixes": list(shared_memory_prefixes)}) + "\n"
    with _lock:
        _watched[group] = line
        _send(line)


def forget(group: int) -> None:
    """The group has been stopped by its launcher (``ManagedProcess.stop``)."""
    with _lock:
        if _watched.pop(group, None) is not None:
            _send(json.dumps({"forget": group}) + "\n")


def pid() -> Optional[int]:
    """This process's reaper, if it has started one."""
    return _reaper.pid if _reaper is not None else None


def is_reaper(process_id: int) -> bool:
    """Whether ``process_id`` runs this module (any process's reaper)."""
    if _reaper is not None and process_id == _reaper.pid:
        return True
    # A process still inside exec() has an empty cmdline for a moment after its parent's Popen returned (the
    # kernel closes the close-on-exec pipe Popen waits for before it maps the new arguments): read again.
    deadline = time.monotonic() + 0.5
    while True:
        try:
            with open(f"/proc/{process_id}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{process_id}/stat", "rb") as handle:
                zombie = handle.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except OSError:
            return False
        if cmdline or zombie or time.monotonic() > deadline:
            return _MODULE.encode() in cmdline.split(b"\0")
        time.sleep(0.001)


def _send(line: str) -> None:
    """Write ``line`` to the reaper, starting one if there is none (or a new one if it died: it then learns
    every group still recorded). Call with ``_lock`` held."""
    global _reaper
    for _ in range(2):
        if _reaper is None or _reaper.poll() is not None:
            if _reaper is not None:
                logger.warning("the process reaper (pid %d) exited with %s; starting another", _reaper.pid,
                               _reaper.returncode)
            _reaper = _start()
            line = "".join(_watched.values())
        try:
            _reaper.stdin.write(line.encode())
            _reaper.stdin.flush()
            return
        except (BrokenPipeError, ValueError):  # it died since the check
            _reaper.wait()
    raise RuntimeError(f"could not start the process reaper (python -m {_MODULE})")


def _start() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", _MODULE, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)


_abandoned: list = []  # a forked child's copy of its parent's reaper, never closed there (see below)


def _forget_after_fork() -> None:
    # A child forked from a launcher starts a reaper of its own, and must not hold its parent's pipe open. The
    # pipe's descriptor is pointed at /dev/null instead of closed through its file object: closing would flush
    # (taking a lock another thread of the parent may have held at the fork) and could resend a line.
    global _reaper, _lock
    if _reaper is not None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, _reaper.stdin.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        _abandoned.append(_reaper)
    _reaper, _lock = None, threading.Lock()
    _watched.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


# -- the reaper process -------------------------------------------------------------------------------------


def _say(message: str) -> None:
    try:  # the launcher's stderr may be a pipe whose reader is gone too
        sys.stderr.write(f"alp reaper (pid {os.getpid()}): {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _stop(group: int, leader_stop_signal: int, prefixes: Sequence[str]) -> None:
    from alp_megatron.rollout.process import group_running, group_shared_memory, stop_group, unlink_left_behind

    if not group_running(group):
        return
    files = group_shared_memory(group, prefixes)
    _say(f"its launcher is gone; stopping process group {group}")
    if stop_group(group, f"process group {group}", leader_stop_signal or None, timeout=5.0):
        unlink_left_behind(files, f"process group {group}")


def _apply(line: bytes, groups: dict) -> None:
    """One message of the launcher: ``{"watch": group, "leader_stop_signal": n, "shared_memory_prefixes": [..]}``
    or ``{"forget": group}``. A line it cannot read is reported and skipped."""
    try:
        message = json.loads(line)
        if "watch" in message:
            groups[int(message["watch"])] = (int(message["leader_stop_signal"]),
                                             tuple(str(p) for p in message["shared_memory_prefixes"]))
        elif "forget" in message:
            groups.pop(int(message["forget"]), None)
        else:
            raise ValueError("neither watch nor forget")
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        _say(f"skipped a message it cannot read ({error}): {line[:200]!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = int(argv[0])
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    groups: dict[int, tuple[int, tuple[str, ...]]] = {}
    pending = b""
    stdin = sys.stdin.fileno()
    while True:
        parent_gone = os.getppid() != launcher
        if select.select([stdin], [], [], 0 if parent_gone else 1.0)[0]:
            chunk = os.read(stdin, 65536)
            if not chunk:
                break  # every write end is closed: the launcher is gone
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _apply(line, groups)
        elif parent_gone:  # what the launcher wrote before it died has been read
            break
    stoppers = [threading.Thread(target=_stop, args=(group, *how)) for group, how in groups.items()]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
