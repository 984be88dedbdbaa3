"""A trainer rank ends within seconds of the launcher that started it.

torchrun's agent starts every worker in a session of its own and ends them itself only when it exits
cleanly; killed (SIGKILL, the OOM killer, a lost node agent), it leaves them running as orphans that go on
training, write checkpoints into a run the user believes stopped, and keep their SGLang servers holding the
GPUs. :func:`follow_launcher` watches for that: a thread sees the rank's parent change (the kernel hands an
orphan to another parent), stops the process groups this rank launched, and interrupts the main thread with
:class:`LauncherGone` (raised by a SIGUSR1 handler), so the run unwinds as after any error (sinks closed,
engines stopped, the process group destroyed); if the process has not ended after a grace period (a rank
blocked inside a collective whose peers are gone does not unwind), it ends it. Processes this rank launched
stop also if the rank itself is killed: see :mod:`alp_megatron.rollout.reaper`.

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
    """This process's launcher died."""


class LauncherWatch:
    """Watches this process's parent, ``launcher_pid``; see the module docstring. Start it from the main
    thread (it installs the SIGUSR1 handler there) and :meth:`disarm` it there once the run is over. A SIGUSR1
    that does not come from the watch (Slurm's ``--signal``, a user) goes to the handler that was there
    before."""

    def __init__(self, launcher_pid: int, interval_s: float = 0.5, grace_s: float = 10.0):
        self.launcher_pid = launcher_pid
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.gone = threading.Event()
        self._armed = False
        self._previous = signal.SIG_DFL
        self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)

    def start(self) -> "LauncherWatch":
        if os.getppid() != self.launcher_pid:
            raise LauncherGone(f"the launcher (pid {self.launcher_pid}) exited before this rank started")
        self._previous = signal.signal(signal.SIGUSR1, self._interrupt) or signal.SIG_DFL  # None: set in C
        self._armed = True
        self._thread.start()
        return self

    def launcher_gone(self) -> bool:
        """Whether the launcher has died (checked now, not at the next poll)."""
        return self.gone.is_set() or os.getppid() != self.launcher_pid

    def disarm(self) -> None:
        """The run is over (main thread): an interruption still on its way raises nothing, and SIGUSR1 goes
        back to its previous handler."""
        if self._armed:
            self._armed = False
            signal.signal(signal.SIGUSR1, self._previous)

    def _interrupt(self, signum, frame) -> None:
        # Runs in the main thread, between two bytecodes: no race with disarm().
        if not self.gone.is_set():  # not ours: what SIGUSR1 did before
            if callable(self._previous):
                self._previous(signum, frame)
            elif self._previous == signal.SIG_DFL:
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGUSR1)
            return
        if self._armed:
            self._armed = False
            raise LauncherGone(f"the launcher (pid {self.launcher_pid}) is gone")

    def _watch(self) -> None:
        while os.getppid() == self.launcher_pid:
            time.sleep(self.interval_s)
        self.gone.set()
        deadline = time.monotonic() + self.grace_s
        try:
            logger.error("the launcher (pid %d) is gone: stopping what this rank launched, then this rank",
                         self.launcher_pid)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # the run unwinds meanwhile
            from alp_megatron.rollout.process import stop_launched

            stop_launched(why=f"the launcher (pid {self.launcher_pid}) is gone")
        except BaseException:  # the exit below must come whatever happened here
            logger.exception("stopping after the launcher's death failed")
        finally:
            time.sleep(max(0.0, deadline - time.monotonic()))
            logger.error("still running %.0f s after the launcher died (blocked in a collective?); exiting",
                         self.grace_s)
            logging.shutdown()
            os._exit(1)


def follow_launcher() -> LauncherWatch | None:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set): watch the launcher, the parent process. None otherwise."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return LauncherWatch(os.getppid()).start()  # (torchrun may be pid 1 itself, in a container)
