"""A trainer rank ends within seconds of the launcher that started it.

torchrun's agent starts every worker in a session of its own and ends them itself only when it exits
cleanly; killed (SIGKILL, the OOM killer, a lost node agent), it leaves them running as orphans that go on
training, write checkpoints into a run the user believes stopped, and keep their SGLang servers holding the
GPUs. :func:`follow_launcher` watches for that: a thread sees the rank's parent change (the kernel hands an
orphan to another parent), stops the process groups this rank launched, interrupts the main thread so the
run unwinds as after Ctrl-C (sinks closed, engines stopped, the process group destroyed), and ends the
process if that has not happened after a grace period (a rank blocked inside a collective whose peers are
gone does not unwind). Processes this rank launched stop also if the rank itself is killed: see
:mod:`alp_megatron.rollout.reaper`.

Only ranks started by torchrun follow their launcher: a single-rank ``alp-train`` started from a shell goes
on when that shell exits (``nohup``), as any program does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from alp_megatron.errors import AlpError

logger = logging.getLogger(__name__)


class LauncherGone(AlpError):
    """This process's launcher died before it started (its parent is already init)."""


class LauncherWatch:
    """Watches this process's parent, ``launcher_pid``; see the module docstring. ``gone`` is set once it
    has died."""

    def __init__(self, launcher_pid: int, interval_s: float = 0.5, grace_s: float = 10.0):
        self.launcher_pid = launcher_pid
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.gone = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)

    def start(self) -> "LauncherWatch":
        if os.getppid() != self.launcher_pid:
            raise LauncherGone(f"the launcher (pid {self.launcher_pid}) exited before this rank started")
        self._thread.start()
        return self

    def _watch(self) -> None:
        while os.getppid() == self.launcher_pid:
            time.sleep(self.interval_s)
        self.gone.set()
        logger.error("the launcher (pid %d) is gone: stopping what this rank launched, then this rank",
                     self.launcher_pid)
        from alp_megatron.rollout.process import stop_launched

        stop_launched(why=f"the launcher (pid {self.launcher_pid}) is gone")
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # unwinds as after Ctrl-C
        time.sleep(self.grace_s)
        logger.error("still running %.0f s after the launcher died (blocked in a collective?); exiting",
                     self.grace_s)
        logging.shutdown()
        os._exit(1)


def follow_launcher() -> LauncherWatch | None:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set): watch the launcher, the parent process. None otherwise."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()
    if parent == 1:
        raise LauncherGone("the launcher exited before this rank started (its parent is init)")
    return LauncherWatch(parent).start()
