"""One child process in its own process group with its own log file, stopped by process id.

SGLang servers and the router both spawn children (scheduler, detokenizer, router workers); putting each
launch in a new session makes its process id the group id, so stopping signals exactly the processes
this launch created and nothing else on the machine.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import random
import signal
import socket
import subprocess
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Mapping, Optional, Sequence

import requests

from alp_megatron.rollout import reaper

logger = logging.getLogger(__name__)

_live: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Ports are picked for processes that bind them only later (an SGLang server binds its HTTP port after it
# has loaded its model). The OS hands out ports from its ephemeral range (ip_local_port_range) to every
# bind to port 0, every outgoing connection and every gloo listener, so a port picked there may be taken by
# then: an SGLang scheduler starting beside a second server was seen listening (gloo) on the HTTP port that
# had been picked for that server. Picks come from below the ephemeral range instead, and below the range
# SGLang picks its own internal ports from (22000-29999). Where the ephemeral range starts lower, the picks
# stay below it; where too few ports are left, the OS picks.
PICK_PORT_RANGE = (10000, 21999)


def pick_port_range() -> tuple[int, int]:
    """:data:`PICK_PORT_RANGE`, cut below this host's ephemeral range (``ip_local_port_range``)."""
    low, high = PICK_PORT_RANGE
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            ephemeral_low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return low, high
    return low, min(high, ephemeral_low - 1)


def _bind_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing uses right now, from :func:`pick_port_range`
    (at random, so that separate processes rarely pick the same one); the OS picks when that range is full
    or holds fewer than 1000 ports."""
    low, high = pick_port_range()
    chooser = random.SystemRandom()  # never the seeded global generator: ranks seeded alike would collide
    picked: list[int] = []
    candidates = range(low, high + 1) if high - low + 1 >= 1000 else range(0)
    for port in chooser.sample(candidates, min(len(candidates), 64 * count)):
        if len(picked) == count:
            break
        if _bind_free(host, port):
            picked.append(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while len(picked) < count:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in picked:
            picked.append(port)
    return picked


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing uses right now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host`` (wildcards become loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def base_url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ManagedProcess:
    """A command run in a new process group, its output appended to ``log_path``."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], log_path: str,
                 leader_stop_signal: Optional[int] = None, shared_memory_prefixes: Sequence[str] = (),
                 start_failure_lines: Sequence[str] = ()):
        """``leader_stop_signal``: sent to the leader alone before the group is signalled, for programs
        that end their own children when their leader dies. ``shared_memory_prefixes``: names of
        ``/dev/shm`` files the program leaves behind when killed; those its processes were seen to use
        (:meth:`note_shared_memory`, and at stop) are unlinked once the whole group has exited.
        ``start_failure_lines``: text that, in a log line written after the start, means the start failed
        even while the process stays up (:meth:`wait_http_ok` then gives up at once; the line is kept in
        :attr:`start_failure`)."""
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.leader_stop_signal = leader_stop_signal
        self.shared_memory_prefixes = tuple(shared_memory_prefixes)
        self.start_failure_lines = tuple(start_failure_lines)
        self.start_failure: Optional[str] = None
        self._log_scanned = 0  # where in the log the search for start_failure_lines goes on
        self._shared_memory: set[str] = set()
        self._popen: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        if self.is_alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.command)}\n".encode())
            log.flush()
            self._log_scanned, self.start_failure = log.tell(), None
            self._popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        _live.add(self)
        reaper.watch(self._popen.pid, self.leader_stop_signal, self.shared_memory_prefixes)
        logger.info("%s started: pid %d, log %s", self.name, self._popen.pid, self.log_path)

    def is_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> Optional[int]:
        return None if self._popen is None else self._popen.poll()

    def note_shared_memory(self) -> None:
        """Remember the ``/dev/shm`` files with :attr:`shared_memory_prefixes` that the group uses now."""
        if self._popen is not None and self.shared_memory_prefixes:
            self._shared_memory |= group_shared_memory(self._popen.pid, self.shared_memory_prefixes)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the group (:func:`stop_group`: ``leader_stop_signal`` to the leader, SIGTERM to the group,
        SIGKILL after ``timeout`` s), then unlink the noted shared-memory files the group left behind."""
        if self._popen is None:
            return
        group = self._popen.pid  # start_new_session: the group id is the leader's pid
        self.note_shared_memory()
        gone = stop_group(group, self.name, self.leader_stop_signal, timeout, reap=self._popen.poll)
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if gone:
            self._unlink_shared_memory()
            reaper.forget(group)
        _live.discard(self)

    def _unlink_shared_memory(self) -> None:
        unlink_left_behind(self._shared_memory, self.name)
        self._shared_memory.clear()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log file ('' when there is none yet)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 256 * 1024))
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(deque(text.splitlines(), maxlen=lines))

    def _start_failure_in_log(self) -> Optional[str]:
        """The first complete log line since the last look that holds one of :attr:`start_failure_lines`."""
        if not self.start_failure_lines:
            return None
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_scanned)
                written = log.read()
        except FileNotFoundError:
            return None
        complete = written[: written.rfind(b"\n") + 1]
        self._log_scanned += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            if any(text in line for text in self.start_failure_lines):
                return line.strip()
        return None

    def wait_http_ok(self, url: str, path: str, timeout: float, headers: Optional[dict] = None) -> Optional[str]:
        """Poll ``GET url+path`` until it answers 200. Returns None on success, else why it did not.

        Each check runs on a worker thread while the process and its log are watched, so an exit or a start
        failure ends the wait at once even while a check hangs on whatever holds the port."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-check")
        try:  # not a with-block: leaving it would wait for a hanging check
            check = None
            while time.monotonic() < deadline:
                alive = self.is_alive()  # before the log is read: an exit's last words are in the log then
                self.start_failure = self._start_failure_in_log()
                if self.start_failure is not None:
                    return f"failed to start; its log says: {self.start_failure}"
                if not alive:
                    return f"exited with code {self.returncode()} before becoming healthy"
                if check is None:
                    check = pool.submit(requests.get, url + path, headers=headers, timeout=10)
                    next_check = time.monotonic() + 0.5
                elif check.done():
                    try:
                        answer = check.result()
                        if answer.status_code == 200:
                            return None
                        last = f"{path} answered HTTP {answer.status_code}"
                    except requests.RequestException as error:
                        last = f"{path}: {type(error).__name__}"
                    if time.monotonic() >= next_check:
                        check = None
                        continue
                time.sleep(0.05)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return f"did not become healthy within {timeout:.0f} s (last check: {last})"


class ManagedService:
    """A long-running HTTP service in its own process group (an SGLang server, the router).

    Subclasses provide ``url``, ``log_path``, ``command()``, ``environment()``, ``startup_timeout_s`` and
    the ``kind`` and ``health_path`` used in messages and health checks; this class starts, waits for
    health, stops and serves as a context manager (start + wait on entry, stop on exit).
    """

    kind = "service"
    health_path = "/health"
    startup_timeout_s = 120.0
    stop_timeout_s = 20.0
    leader_stop_signal: Optional[int] = None  # see ManagedProcess
    shared_memory_prefixes: tuple[str, ...] = ()
    start_failure_lines: tuple[str, ...] = ()

    _process: Optional[ManagedProcess] = None

    url: str
    log_path: str

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def start(self):
        """Launch the process (returns at once; see :meth:`wait_healthy`)."""
        if self.is_alive():
            raise RuntimeError(f"{self.kind} {self.url} is already running (pid {self.pid})")
        self._process = ManagedProcess(f"{self.kind} {self.url}", self.command(), self.environment(),
                                       self.log_path, leader_stop_signal=self.leader_stop_signal,
                                       shared_memory_prefixes=self.shared_memory_prefixes,
                                       start_failure_lines=self.start_failure_lines)
        self._process.start()
        return self

    def wait_healthy(self, timeout: Optional[float] = None):
        """Block until ``GET health_path`` answers 200; raise :class:`ServerStartError` with the log tail
        (after stopping the process) if it does not within ``timeout`` (default ``startup_timeout_s``)."""
        from alp_megatron.rollout.errors import ServerStartError

        if self._process is None:
            raise RuntimeError(f"{self.kind} {self.url} was never started; call start() first")
        timeout = self.startup_timeout_s if timeout is None else timeout
        problem = self._process.wait_http_ok(self.url, self.health_path, timeout)
        if problem is not None:
            tail = self.log_tail(60)
            self.stop()
            raise ServerStartError(self.kind, self.url, problem, self.log_path, tail)
        self._process.note_shared_memory()  # what it made while starting, in case it dies before stop()
        logger.info("%s %s healthy (pid %s)", self.kind, self.url, self.pid)
        return self

    def is_alive(self) -> bool:
        """True while the main process runs (it may still be starting)."""
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the process group (:meth:`ManagedProcess.stop`; ``timeout`` defaults to ``stop_timeout_s``)."""
        if self._process is not None:
            self._process.stop(self.stop_timeout_s if timeout is None else timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return self._process.log_tail(lines) if self._process is not None else ""

    def __enter__(self):
        self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_group(group: int, name: str, leader_stop_signal: Optional[int] = None, timeout: float = 20.0,
               reap: Callable[[], object] = lambda: None) -> bool:
    """Stop process group ``group``: send ``leader_stop_signal`` (if set) to its leader alone and give the
    group 5 s to exit; then SIGTERM the group, wait up to ``timeout`` s, and SIGKILL what still runs of it.
    ``reap`` is called while waiting (the launcher's ``Popen.poll``, so that its exited leader is reaped).
    Returns whether the group is gone. Works for any group, also one whose launcher has died."""
    if leader_stop_signal is not None and leads_group(group):
        _signal_pid(group, leader_stop_signal)
        _wait_group_exit(group, 5.0, reap)
    if group_running(group):
        _signal_group(group, signal.SIGTERM)
        if not _wait_group_exit(group, timeout, reap):
            logger.warning("%s (group %d) still ran %.0f s after SIGTERM; sending SIGKILL", name, group, timeout)
            _signal_group(group, signal.SIGKILL)
            _wait_group_exit(group, 10.0, reap)
    return not group_running(group)


def _wait_group_exit(group: int, timeout: float, reap: Callable[[], object]) -> bool:
    deadline = time.monotonic() + timeout
    while group_running(group):
        reap()
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def leads_group(group: int) -> bool:
    """Whether a running (not zombie) process with pid ``group`` leads process group ``group``: a pid
    reused by an unrelated process does not."""
    return any(pid == group and pgrp == group for pid, _, pgrp, _ in _running_processes(only=group))


def _signal_group(group: int, sig: int) -> bool:
    try:
        os.killpg(group, sig)
        return True
    except ProcessLookupError:
        return False


def group_running(group: int) -> bool:
    """Whether a process of ``group`` still runs (exited members waiting to be reaped do not count)."""
    if not _signal_group(group, 0):
        return False
    if not os.path.isdir("/proc"):
        return True
    return bool(group_members(group))


def _running_processes(only: Optional[int] = None) -> Iterator[tuple[int, int, int, int]]:
    """``(pid, ppid, process group, session)`` of every process that runs (Linux ``/proc``; not zombies), or of
    process ``only``."""
    try:
        entries = [str(only)] if only is not None else os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", errors="replace") as handle:  # the name may be any bytes
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command name: state, ppid, pgrp, session, ...
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2]), int(fields[3])


def group_members(group: int) -> list[int]:
    """The process ids of ``group`` that still run (Linux ``/proc``; zombies do not count)."""
    return [pid for pid, _, pgrp, _ in _running_processes() if pgrp == group]


def stop_unrecorded_launches() -> list[int]:
    """SIGKILL the process group of every child of this process that leads a session of its own and is no
    :class:`ManagedProcess` known here: a launch that a signal handler's exception cut off between its fork
    and its record. Returns those group ids. Only for programs whose every such child is a launch of this
    module (other libraries may start sessions too)."""
    recorded = {process.pid for process in _live_processes()}
    stopped = []  # (the reaper leads a session too, and session_leading_children leaves it out)
    for pid in session_leading_children(os.getpid()):
        if pid not in recorded:
            logger.warning("stopping process group %d, launched here but never recorded", pid)
            _signal_group(pid, signal.SIGKILL)
            stopped.append(pid)
    return stopped


def _live_processes() -> list["ManagedProcess"]:
    while True:  # another thread may start a process meanwhile: the set then changed size under the copy
        try:
            return list(_live)
        except RuntimeError:
            continue


def session_leading_children(parent: int) -> list[int]:
    """The running children of ``parent`` that lead a session of their own: launches of this module (its
    reaper, see :mod:`alp_megatron.rollout.reaper`, left out)."""
    return [pid for pid, ppid, _, session in _running_processes()
            if ppid == parent and session == pid and not reaper.is_reaper(pid)]


def unlink_left_behind(paths, name: str) -> None:
    """Unlink the shared-memory files ``paths`` that the stopped group ``name`` left behind."""
    for path in sorted(paths):
        try:
            os.unlink(path)
            logger.debug("%s: removed %s, left behind in shared memory", name, path)
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("%s: could not remove %s, left behind in shared memory: %s", name, path, error)


def group_shared_memory(group: int, prefixes: Optional[Sequence[str]] = None) -> set[str]:
    """The ``/dev/shm`` files that the running processes of ``group`` have mapped or open (only those whose
    name starts with one of ``prefixes``, when given)."""
    if prefixes is not None:
        return {path for path in group_shared_memory(group) if os.path.basename(path).startswith(tuple(prefixes))}
    paths: set[str] = set()
    for pid in group_members(group):
        try:
            with open(f"/proc/{pid}/maps", errors="surrogateescape") as maps:  # paths as the OS spells them
                for line in maps:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith("/dev/shm/") and not path.endswith(" (deleted)"):
                        paths.add(path)
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process exited meanwhile, or is not ours to read
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/") and not target.endswith(" (deleted)"):
                paths.add(target)
    return paths


@atexit.register
def stop_launched(why: str = "left running at exit", timeout: float = 5.0) -> None:
    """Stop every process group this process launched and has not stopped yet (from any thread)."""
    for process in _live_processes():
        if process.is_alive() or (process.pid is not None and group_running(process.pid)):
            logger.warning("stopping %s (pid %s): %s", process.name, process.pid, why)
            process.stop(timeout=timeout)
