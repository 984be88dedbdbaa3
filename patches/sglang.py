"""What an SGLang server needs to start on a machine without a GPU (import stand-ins, env vars, flags),
how any SGLang server is stopped without a false crash report or files left in /dev/shm, and how a start
that lost its port is told apart.

Upstream limitation: SGLang 0.5.23 runs on CPU (``--device cpu``, ``SGLANG_USE_CPU_ENGINE=1``) with its
torch-native attention and sampling, but two packages it imports at module level cannot be installed
for CPU from PyPI:

* ``sgl_kernel``: the CPU build (``sglang-kernel-cpu``, compiled from ``sgl-kernel/csrc/cpu``) is not
  published; PyPI's ``sglang-kernel`` is CUDA-only and fails to load without ``libcuda.so.1``. SGLang
  imports kernel names from it unconditionally on CPU (``from sgl_kernel import ...`` in the KV-cache and
  memory modules), although the torch-native paths never call them.
* ``torchvision``: PyPI's x86_64 build is compiled against CUDA torch and raises
  ``operator torchvision::nms does not exist`` beside ``torch+cpu``; SGLang imports
  ``torchvision.transforms`` on the config-loading path of every model.

``sglang_cpu/`` beside this file holds two stand-in packages that satisfy those imports (every name
raises ``NotImplementedError`` when called), and a ``sitecustomize.py`` with two runtime stand-ins: request
seeds honoured on CPU, and the host buffers of ``--enable-return-routed-experts`` (MoE routes) allocated
without ``cudaHostRegister``, which otherwise kills a CPU server at start-up (its docstring says more). They are put on the **server process's** ``PYTHONPATH``
only, never imported into ours, and only when ``torch.cuda.is_available()`` is False; on a GPU machine
the real packages are used and :func:`server_environment` adds no path. The stand-ins depend on the
lazy-import structure of one SGLang release, so every entry point checks the installed version first
(:func:`check_version`). ``tests/patches/test_sglang.py`` shows the stand-ins are needed and sufficient,
that a killed server leaves its load-snapshot file behind unless the launcher removes it
(:data:`LAUNCHER_STOP_SIGNAL`, :data:`SHARED_MEMORY_LEFT_BEHIND`), and that a server whose port was taken
stays up without serving (:data:`START_FAILURE_LOG_LINES`).
"""

from __future__ import annotations

import os
import signal
from importlib import metadata
from typing import Mapping, Optional

from packaging.version import Version

SUPPORTED_VERSION = Version("0.5.23")

# Flags without which a CPU server does not start or reaches a stand-in kernel: torch-native attention
# and sampling, no overlap scheduler (it needs CUDA streams), no grammar backend (xgrammar's CPU path is
# not needed for RL rollouts and pulls more kernels). --sleep-on-idle: an idle scheduler otherwise
# busy-polls and holds one CPU core at ~75% (measured), which starves the trainer on the same CPUs.
CPU_SERVER_ARGS: tuple[str, ...] = (
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-overlap-schedule",
    "--grammar-backend", "none",
    "--sleep-on-idle",
)

# SGLang picks its platform from this variable; without it the generic path imports vllm kernels.
# ALP_SGLANG_SEEDED_SAMPLING: request seeds are honoured on CPU (sglang_cpu/sitecustomize.py).
CPU_ENV: Mapping[str, str] = {"SGLANG_USE_CPU_ENGINE": "1", "ALP_SGLANG_SEEDED_SAMPLING": "1"}


# Stopping a server. SGLang 0.5.23's launcher starts its scheduler and detokenizer with
# PR_SET_PDEATHSIG=SIGKILL and tears them down itself with SIGKILL (kill_process_tree); no process of it
# cleans up on a signal. A SIGTERM to the whole group makes the launcher's watchdog take the scheduler's
# exit for a crash: it logs "Subprocess scheduler_0 crashed ... SIGQUIT received" and sleeps 5 s for crash
# diagnostics (SGLANG_PYSPY_DUMP_BEFORE_CRASH and SGLANG_CUDA_COREDUMP_BEFORE_CRASH, on by default) before
# it exits (measured: 5.8 s per stop, and its semaphore left in /dev/shm). A SIGKILL to the launcher alone
# ends the group within a fraction of a second (its children by PDEATHSIG) and lets its multiprocessing
# resource tracker unlink the semaphores it made; the group stop follows for anything left. (It also skips
# the graceful end of the opt-in weight-cache daemons, `--weight-cache-mode daemon`, which we do not use.)
LAUNCHER_STOP_SIGNAL = signal.SIGKILL

# Files a killed server leaves in /dev/shm, on every stop: the scheduler's load-snapshot file
# (managers/load_snapshot.py, 16 KiB per server start), unlinked only by a clean close that a killed
# scheduler never reaches. SGLang's own sweep for them (utils/stale_shm_cleanup.py) runs only in its CI and
# removes every such file on the machine; the launcher here removes those its own server used.
SHARED_MEMORY_LEFT_BEHIND: tuple[str, ...] = ("sglang_loads_",)

# A server binds its HTTP port only after it has loaded its model. When the port has been taken by then,
# SGLang 0.5.23's launcher logs uvicorn's bind error and then waits in its app's shutdown for its warm-up
# thread, which keeps polling the taken port: it neither serves nor exits (measured: still up 7 minutes
# later, its health wait running to the timeout). The launcher here takes this log line for a failed start.
PORT_TAKEN_LOG_LINE = "error while attempting to bind on address"
START_FAILURE_LOG_LINES: tuple[str, ...] = (PORT_TAKEN_LOG_LINE,)


# Architectures whose SGLang 0.5.23 model class never ties lm_head to embed_tokens (models/qwen3_moe.py builds its
# own ParallelLMHead whatever tie_word_embeddings says): a tied checkpoint has no lm_head.weight to load, so the
# server would sample from a randomly initialised output layer, and no weight update could fix it.
NEVER_TIED: tuple[str, ...] = ("Qwen3MoeForCausalLM",)


def installed_version() -> Optional[Version]:
    """The installed sglang version, or None when sglang is not installed."""
    try:
        return Version(metadata.version("sglang"))
    except metadata.PackageNotFoundError:
        return None


def check_version(version: Optional[Version | str] = None) -> Version:
    """Return the sglang version (``version`` or the installed one); raise if it is not the supported one."""
    found = installed_version() if version is None else Version(str(version))
    if found is None:
        raise RuntimeError(
            f"sglang is not installed; install sglang=={SUPPORTED_VERSION} "
            "(`pip install 'alp-megatron[sglang]'` on a GPU machine, `make venv` for the CPU recipe)"
        )
    if found != SUPPORTED_VERSION:
        raise RuntimeError(
            f"sglang {found} is installed, but alp-megatron's rollout client and CPU stand-ins were verified "
            f"only on sglang=={SUPPORTED_VERSION} (its weight-update HTTP API changes between releases); "
            f"install sglang=={SUPPORTED_VERSION}"
        )
    return found


def cpu_stand_ins_dir() -> str:
    """The folder holding the ``sgl_kernel`` and ``torchvision`` stand-in packages."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_cpu")


def needs_cpu_stand_ins() -> bool:
    """True on a machine without a usable CUDA device, where the stand-ins must be on the server's path."""
    import torch

    return not torch.cuda.is_available()


def server_environment(base: Optional[Mapping[str, str]] = None, device: str = "cpu") -> dict[str, str]:
    """The environment for an SGLang server process on ``device``, built from ``base`` (default os.environ).

    For ``device="cpu"`` it sets :data:`CPU_ENV`; when there is no GPU it also prepends
    :func:`cpu_stand_ins_dir` to ``PYTHONPATH``. Otherwise ``base`` is returned unchanged (as a copy).
    """
    check_version()
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        env.update(CPU_ENV)
    if needs_cpu_stand_ins():
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = cpu_stand_ins_dir() + (os.pathsep + existing if existing else "")
    return env


def server_args(device: str) -> tuple[str, ...]:
    """Launch flags SGLang needs on ``device`` beyond the user's own (:data:`CPU_SERVER_ARGS` on CPU)."""
    return CPU_SERVER_ARGS if device == "cpu" else ()
