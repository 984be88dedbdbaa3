"""The SGLang CPU stand-ins (``patches/sglang.py``) are needed and sufficient, the version guard holds, and
a killed server's leftover in /dev/shm is real and removed by the launcher.

The same process then allocates the host buffer of ``--enable-return-routed-experts`` the way SGLang does,
without and with the host-buffer stand-in of ``sglang_cpu/sitecustomize.py``.

One fresh process (CPU engine on) imports SGLang's scheduler and HTTP server modules three times,
putting one more stand-in on ``sys.path`` before each try: with none the model configs fail on
``torchvision``; with the ``torchvision`` stand-in the KV-cache kernels fail on ``sgl_kernel``; with
both the modules import. (One process instead of three: each import of SGLang costs ~10 s of CPU.)
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from alp_megatron._patches import sglang as sglang_patch

STAGED_IMPORT = """
import importlib, json, os, sys
stand_ins, scratch = sys.argv[1], sys.argv[2]
shared = os.path.join(scratch, "shared")  # the stand-ins' common helper; it satisfies no import by itself
os.makedirs(shared)
os.symlink(os.path.join(stand_ins, "alp_stand_in.py"), os.path.join(shared, "alp_stand_in.py"))
sys.path.insert(0, shared)
for added in (None, "torchvision", "sgl_kernel"):
    if added:
        folder = os.path.join(scratch, added)
        os.makedirs(folder)
        os.symlink(os.path.join(stand_ins, added), os.path.join(folder, added))
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
    try:
        import sglang.srt.managers.scheduler, sglang.srt.entrypoints.http_server
        outcome = "imported"
    except ImportError as error:
        outcome = str(error)
    print(json.dumps({"added": added, "outcome": outcome}), flush=True)

# the host buffer of --enable-return-routed-experts, without and with the stand-in of sitecustomize.py
import importlib.util, torch
from sglang.srt.mem_cache.pool_host import common
def allocate():
    try:
        buffer = common.ALLOC_MEMORY_FUNCS["cpu"]((4, 2, 2), dtype=torch.int32, device="cpu", pin_memory=True,
                                                  allocator=common.HostTensorAllocator())
        return "allocated %s" % (tuple(buffer.shape),)
    except Exception as error:
        return type(error).__name__
print(json.dumps({"added": "host buffers: none", "outcome": allocate()}), flush=True)
spec = importlib.util.spec_from_file_location("alp_sitecustomize", os.path.join(stand_ins, "sitecustomize.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module._install_host_buffers(common)
print(json.dumps({"added": "host buffers: stand-in", "outcome": allocate()}), flush=True)
"""

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-ins are used only without a GPU")


@pytest.fixture(scope="module")
def staged_import(tmp_path_factory) -> dict:
    """Outcome of the import after adding no stand-in, the torchvision one, then the sgl_kernel one."""
    scratch = tmp_path_factory.mktemp("stand-ins")
    env = {**os.environ, **sglang_patch.CPU_ENV, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", STAGED_IMPORT, sglang_patch.cpu_stand_ins_dir(), str(scratch)],
                            env=env, cwd=str(scratch), capture_output=True, text=True, timeout=600)
    outcomes = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            step = json.loads(line)
            outcomes[step["added"]] = step["outcome"]
    assert len(outcomes) == 5, result.stdout[-2000:] + result.stderr[-3000:]
    return outcomes


@cpu_only
def test_real_packages_are_absent_here():
    for name in ("sgl_kernel", "torchvision"):
        found = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        assert found.returncode != 0 and "No module named" in found.stderr, name


@cpu_only
def test_without_stand_ins_the_server_modules_fail_on_torchvision(staged_import):
    assert staged_import[None] == "No module named 'torchvision'"


@cpu_only
def test_without_sgl_kernel_stand_in_the_server_modules_fail_on_sgl_kernel(staged_import):
    assert staged_import["torchvision"] == "No module named 'sgl_kernel'"


@cpu_only
def test_with_both_stand_ins_the_server_modules_import(staged_import):
    assert staged_import["sgl_kernel"] == "imported"


@cpu_only
def test_routed_experts_host_buffers_need_the_stand_in_without_cuda(staged_import):
    """SGLang pins the host buffer of --enable-return-routed-experts with cudaHostRegister, which fails
    without CUDA; the stand-in allocates it unpinned (a server then starts: tests/rollout/test_routes.py)."""
    assert not staged_import["host buffers: none"].startswith("allocated")
    assert staged_import["host buffers: stand-in"] == "allocated (4, 2, 2)"


def test_stand_ins_satisfy_any_import_and_raise_when_called(tmp_path):
    script = (
        "import sgl_kernel, torchvision\n"
        "from sgl_kernel.kvcacheio import transfer_kv_all_layer\n"
        "from torchvision.transforms import InterpolationMode, functional\n"
        "class Resize(torchvision.transforms.Compose): pass\n"
        "mode = InterpolationMode.BICUBIC\n"
        "assert sgl_kernel.STAND_IN and torchvision.STAND_IN\n"
        "for call in (lambda: transfer_kv_all_layer(1), lambda: functional.resize(1), lambda: Resize()):\n"
        "    try:\n"
        "        call()\n"
        "    except NotImplementedError as error:\n"
        "        print('raised:', error)\n"
    )
    env = {**os.environ, "PYTHONPATH": sglang_patch.cpu_stand_ins_dir()}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert "sgl_kernel.kvcacheio.transfer_kv_all_layer is not available" in lines[0]
    assert "torchvision.transforms.functional.resize is not available" in lines[1]


def test_version_guard_accepts_only_the_verified_release():
    assert sglang_patch.check_version() == sglang_patch.SUPPORTED_VERSION
    for other in ("0.5.22", "0.5.24", "0.6.0"):
        with pytest.raises(RuntimeError, match=r"sglang==0\.5\.23"):
            sglang_patch.check_version(other)


@cpu_only
def test_cpu_server_environment_adds_stand_ins_and_cpu_engine():
    env = sglang_patch.server_environment({"PYTHONPATH": "/elsewhere"}, device="cpu")
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [sglang_patch.cpu_stand_ins_dir(), "/elsewhere"]
    assert "--attention-backend" in sglang_patch.server_args("cpu") and sglang_patch.server_args("cuda") == ()


def test_a_killed_server_leaves_its_load_snapshot_file_and_stop_removes_it(tmp_path):
    """SGLang's teardown is SIGKILL (kill_process_tree); after it the scheduler's load-snapshot file is
    still in /dev/shm. The launcher's stop, run after the kill, removes the one its server used."""
    from alp_megatron.rollout.process import group_running, group_shared_memory
    from tests.sglang_fixtures import launch_server, tiny_model

    with launch_server(tiny_model(tmp_path / "model"), log_dir=str(tmp_path / "logs")) as server:
        group = server.pid
        used = {path for path in group_shared_memory(group)
                if os.path.basename(path).startswith(sglang_patch.SHARED_MEMORY_LEFT_BEHIND)}
        assert used, f"no {sglang_patch.SHARED_MEMORY_LEFT_BEHIND} file in use by the server: SGLang changed"
        os.killpg(group, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while group_running(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_running(group)
        assert all(os.path.exists(path) for path in used)  # the upstream limitation
        server.stop()
        assert not [path for path in used if os.path.exists(path)]


def test_a_server_whose_port_is_taken_stays_up_without_serving_and_the_launcher_sees_it(tmp_path):
    """SGLang binds its HTTP port after loading the model; when the port is taken by then, the launcher logs
    the bind error and stays up, serving nothing (the upstream limitation). The launcher here stops waiting
    at that log line instead of at the startup timeout."""
    import socket

    from alp_megatron.rollout.process import ManagedProcess, base_url
    from alp_megatron.rollout.server import SGLangServer
    from tests.sglang_fixtures import server_config, tiny_model

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # listens, never answers
        holder.bind(("127.0.0.1", 0))
        holder.listen(16)
        port = holder.getsockname()[1]
        server = SGLangServer(server_config(tiny_model(tmp_path / "model"), port=port, log_dir=str(tmp_path)))
        process = ManagedProcess("sglang on a taken port", server.command(), server.environment(), server.log_path,
                                 leader_stop_signal=sglang_patch.LAUNCHER_STOP_SIGNAL,
                                 shared_memory_prefixes=sglang_patch.SHARED_MEMORY_LEFT_BEHIND,
                                 start_failure_lines=sglang_patch.START_FAILURE_LOG_LINES)
        process.start()
        try:
            problem = process.wait_http_ok(base_url("127.0.0.1", port), "/health", timeout=600)
            assert problem is not None and problem.startswith("failed to start"), problem
            assert sglang_patch.PORT_TAKEN_LOG_LINE in process.start_failure and str(port) in process.start_failure
            time.sleep(5)
            assert process.is_alive(), "SGLang now exits when its port is taken: START_FAILURE_LOG_LINES may go"
        finally:
            process.stop()
        assert not process.is_alive()
