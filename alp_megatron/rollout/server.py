"""Launch, health-check, restart and stop SGLang HTTP servers (``python -m sglang.launch_server``).

Each server runs in its own process group with its own log file and is stopped by process id. A
server binds to loopback by default; any other address needs an API key, which SGLang then requires
as a Bearer token on every call (our clients send it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

from alp_megatron._patches import sglang as sglang_patch
from alp_megatron.errors import ConfigError
from alp_megatron.rollout.errors import ServerStartError
from alp_megatron.rollout.process import ManagedProcess, ManagedService, base_url, free_port, is_loopback

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")
DEVICES = ("cuda", "cpu")

# Set from ServerConfig fields; passing them in extra_args too would make the launch ambiguous.
_OWNED_FLAGS = {
    "--model-path": "model_path", "--model": "model_path", "--port": "port", "--host": "host",
    "--tp-size": "tp_size", "--tensor-parallel-size": "tp_size", "--dtype": "dtype", "--device": "device",
    "--mem-fraction-static": "mem_fraction", "--weight-version": "weight_version", "--api-key": "api_key",
    "--base-gpu-id": "base_gpu_id",
}


TORCH_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                         "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                         "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")



@dataclass(frozen=True)
class ServerConfig:
    """How to launch one SGLang server.

    ``port=0`` picks a free port at the first start (kept across restarts); ``device=None`` means
    cuda when available, else cpu; ``base_gpu_id``: the first of the ``tp_size`` GPUs the server takes
    (SGLang's ``--base-gpu-id``; None: SGLang's default, GPU 0; ignored on CPU); ``mem_fraction`` is SGLang's
    ``--mem-fraction-static``;
    ``extra_args`` are passed to ``sglang.launch_server`` verbatim; ``log_dir=None`` uses a temp folder.
    """

    model_path: str
    port: int = 0
    host: str = "127.0.0.1"
    tp_size: int = 1
    dtype: str = "auto"
    device: Optional[str] = None
    base_gpu_id: Optional[int] = None
    mem_fraction: Optional[float] = None
    weight_version: str = "v0"
    api_key: Optional[str] = None
    extra_args: Sequence[str] = field(default_factory=tuple)
    log_dir: Optional[str] = None
    startup_timeout_s: float = 240.0

    def __post_init__(self):
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        _require(isinstance(self.model_path, str) and self.model_path.strip() != "", "model_path",
                 f"{self.model_path!r} is not a model path", "give an HF model folder or hub id")
        if self.model_path.startswith((os.sep, ".", "~")) or os.path.isdir(self.model_path):
            _require(os.path.isfile(os.path.join(os.path.expanduser(self.model_path), "config.json")),
                     "model_path", f"{self.model_path!r} is not a folder with a config.json",
                     "point it at a Hugging Face model folder (config.json, weights, tokenizer)")
        _require(isinstance(self.port, int) and 0 <= self.port <= 65535, "port",
                 f"{self.port!r} is not a TCP port", "use 1..65535, or 0 to pick a free port")
        _require(isinstance(self.host, str) and self.host != "", "host", f"{self.host!r} is empty",
                 "use 127.0.0.1 (default) or the address to bind")
        _require(is_loopback(self.host) or bool(self.api_key), "host",
                 f"{self.host!r} accepts connections from other machines but api_key is not set",
                 "set api_key (clients then send it as a Bearer token) or bind to 127.0.0.1")
        _require(isinstance(self.tp_size, int) and self.tp_size >= 1, "tp_size",
                 f"{self.tp_size!r} is not a positive integer", "use 1 or the number of GPUs per server")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not supported", f"use one of {DTYPES}")
        _require(self.device is None or self.device in DEVICES, "device", f"{self.device!r} is not supported",
                 f"use one of {DEVICES}, or None to pick cuda when available")
        _require(self.base_gpu_id is None or (isinstance(self.base_gpu_id, int) and self.base_gpu_id >= 0),
                 "base_gpu_id", f"{self.base_gpu_id!r} is not a GPU index", "use 0, 1, ... or None for GPU 0")
        _require(self.mem_fraction is None or (isinstance(self.mem_fraction, (int, float))
                                               and 0.0 < self.mem_fraction < 1.0),
                 "mem_fraction", f"{self.mem_fraction!r} is not a fraction in (0, 1)",
                 "use e.g. 0.8, or None for SGLang's default")
        _require(isinstance(self.weight_version, str) and self.weight_version != "", "weight_version",
                 f"{self.weight_version!r} is empty", "use a label such as 'v0'")
        _require(self.api_key is None or (isinstance(self.api_key, str) and self.api_key != ""), "api_key",
                 "is an empty string", "use None (loopback only) or a non-empty secret")
        for arg in self.extra_args:
            _require(isinstance(arg, str), "extra_args", f"{arg!r} is not a string",
                     "pass command-line tokens as strings, e.g. ('--max-total-tokens', '4096')")
            flag = arg.split("=", 1)[0]
            _require(flag not in _OWNED_FLAGS, "extra_args", f"{flag} is set by this config",
                     f"set ServerConfig.{_OWNED_FLAGS.get(flag)} instead")
        _require(self.startup_timeout_s > 0, "startup_timeout_s", f"{self.startup_timeout_s!r} is not positive",
                 "use the seconds a server may take to load its model, e.g. 240")

    def resolved_device(self) -> str:
        """``device``, or cuda when torch sees a GPU and cpu otherwise."""
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _require(condition: bool, field_name: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(field_name, problem, fix)


class SGLangServer(ManagedService):
    """One SGLang HTTP server process: ``start()``, ``wait_healthy()`` (``GET /health``), ``stop()``,
    ``restart()``. As a context manager it starts, waits for health and stops on exit.
    """

    kind = "SGLang server"
    health_path = "/health"
    # How SGLang 0.5.23 is stopped cleanly and what it leaves behind: see patches/sglang.py.
    leader_stop_signal = sglang_patch.LAUNCHER_STOP_SIGNAL
    shared_memory_prefixes = sglang_patch.SHARED_MEMORY_LEFT_BEHIND
    start_failure_lines = sglang_patch.START_FAILURE_LOG_LINES

    def __init__(self, config: ServerConfig):
        self.config = config
        self.startup_timeout_s = config.startup_timeout_s
        self._port = config.port or None
        self._log_dir = config.log_dir
        self._process: Optional[ManagedProcess] = None
        self._was_healthy = False

    @property
    def port(self) -> int:
        if self._port is None:
            self.pick_port()
        return self._port

    def pick_port(self, avoid: Sequence[int] = ()) -> int:
        """Pick a free port, none of ``avoid``, for a server whose config leaves the port open (``port=0``)
        and that has not served yet."""
        if self.config.port or self._was_healthy:
            raise RuntimeError(f"SGLang server {self.url} keeps its port")
        host = self.config.host if self.config.host != "localhost" else "127.0.0.1"
        port = free_port(host)
        while port in avoid:
            port = free_port(host)
        self._port = port
        return port

    def wait_healthy(self, timeout: Optional[float] = None, avoid_ports: Sequence[int] = ()) -> "SGLangServer":
        """As :meth:`ManagedService.wait_healthy`; and when the port was picked here and another process took
        it before the server bound it (see patches/sglang.py), the first start is made once more on a new
        port, none of ``avoid_ports`` (those of servers starting beside it), with a fresh ``timeout``. A
        configured port that is taken, or a taken port after the server has served, is an error."""
        try:
            super().wait_healthy(timeout)
        except ServerStartError:
            failure = (self._process.start_failure if self._process is not None else None) or ""
            taken = self._port
            lost_port = sglang_patch.PORT_TAKEN_LOG_LINE in failure and re.search(rf"\b{taken}\b", failure)
            if self.config.port or self._was_healthy or not lost_port:
                raise
            first_log = self.log_path
            self.pick_port(avoid=(taken, *avoid_ports))
            logger.warning("port %d was taken by another process before SGLang bound it (%s); starting the "
                           "server again on port %d", taken, first_log, self._port)
            self.start()
            super().wait_healthy(timeout)
        self._was_healthy = True
        return self

    @property
    def url(self) -> str:
        return base_url(self.config.host, self.port)

    @property
    def log_path(self) -> str:
        if self._log_dir is None:
            self._log_dir = tempfile.mkdtemp(prefix="alp-sglang-")
        return os.path.join(self._log_dir, f"sglang-{self.port}.log")

    def command(self) -> list[str]:
        """The ``sglang.launch_server`` command line for this config."""
        cfg = self.config
        device = cfg.resolved_device()
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", os.path.expanduser(cfg.model_path),
            "--host", cfg.host, "--port", str(self.port),
            "--tp-size", str(cfg.tp_size), "--dtype", cfg.dtype, "--device", device,
            "--weight-version", cfg.weight_version,
        ]
        if cfg.base_gpu_id is not None and device == "cuda":
            cmd += ["--base-gpu-id", str(cfg.base_gpu_id)]
        if cfg.mem_fraction is not None:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction)]
        if cfg.api_key:
            cmd += ["--api-key", cfg.api_key]
        cmd += list(sglang_patch.server_args(device))
        cmd += list(cfg.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = sglang_patch.server_environment(device=self.config.resolved_device())
        # A server started by a trainer rank must not join the trainer's torch.distributed world: SGLang's
        # own process group reads these variables (env://) and would wait for the trainer's ranks forever.
        for name in TORCH_DISTRIBUTED_ENV:
            env.pop(name, None)
        if os.path.isdir(os.path.expanduser(self.config.model_path)):
            env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub lookups
        return env

    def restart(self, timeout: Optional[float] = None) -> "SGLangServer":
        """Stop whatever is left of the server, start it again on the same port, and wait for health."""
        logger.warning("restarting SGLang server %s", self.url)
        self.stop()
        self.start()
        return self.wait_healthy(timeout)

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"SGLangServer({self.url}, pid={self.pid}, {state})"


def check_servable(architecture: str, tied_embeddings: bool) -> None:
    """Refuse a checkpoint SGLang would serve wrongly, naming why (see ``patches/sglang.py``)."""
    _require(not (tied_embeddings and architecture in sglang_patch.NEVER_TIED), "model.hf_path",
             f"is a {architecture} with tie_word_embeddings=true, but SGLang {sglang_patch.SUPPORTED_VERSION}'s "
             f"{architecture} never ties its lm_head to the embedding (it would serve an untrained output layer)",
             "use a checkpoint with tie_word_embeddings=false (its own lm_head.weight)")


def start_servers(configs: Sequence[ServerConfig], timeout: Optional[float] = None) -> list[SGLangServer]:
    """Start every server at once, then wait for all to be healthy; on any failure stop them all and raise."""
    servers = [SGLangServer(config) for config in configs]
    picked: list[int] = []
    for server in servers:  # distinct picks, so that two servers never start on one port
        if not server.config.port:
            picked.append(server.pick_port(avoid=picked))
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_healthy(timeout, avoid_ports=picked)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: Sequence[SGLangServer], timeout: float = 20.0) -> None:
    """Stop every server at once (each waits for its own process group to exit)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        for future in [pool.submit(server.stop, timeout) for server in servers]:
            future.result()


class ServerSupervisor:
    """Restarts servers whose process has died, checking every ``interval_s`` seconds in a thread.

    Liveness is the process, not ``/health``: a paused server does not answer ``/health`` but is fine.
    ``on_death(server)`` runs when a death is first seen, before the restart (take the server out of service);
    ``on_restarted(server)`` once it is healthy again. Each restart runs in a thread of its own (servers that die
    together come back together): it stops what is left of the old server (its process group and the
    shared-memory files SGLang leaves, see ``patches/sglang.py``) and starts it on the same port. ``restarts``
    counts restarts per URL; a restart that fails is logged with its log tail and tried again at the next
    check, and after ``max_failures`` failures in a row the server is given up (``given_up``: URL -> why).
    """

    def __init__(self, servers: Sequence[SGLangServer], interval_s: float = 2.0, on_death=None, on_restarted=None,
                 max_failures: int = 3):
        import threading

        self.servers = list(servers)
        self.interval_s = interval_s
        self.on_death, self.on_restarted, self.max_failures = on_death, on_restarted, max_failures
        self.restarts: dict[str, int] = {server.url: 0 for server in self.servers}
        self.failures: dict[str, int] = {server.url: 0 for server in self.servers}
        self.restarting: set[str] = set()
        self.given_up: dict[str, str] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def dead(self) -> list[SGLangServer]:
        """Servers whose process is gone and that are not given up (restarting, or not yet seen)."""
        return [s for s in self.servers if s.url not in self.given_up and s.pid is not None and not s.is_alive()]

    def check_once(self, wait: bool = True) -> None:
        """Start a restart of every server whose process is gone and that is not restarting already; with
        ``wait``, return once every restart running has ended (healthy, or failed)."""
        import threading

        with self._lock:
            for server in self.dead():
                if self._stop.is_set() or server.url in self.restarting:
                    continue
                if self.failures.get(server.url, 0) == 0:
                    logger.error("SGLang server %s (pid %s) died; log tail:\n%s", server.url, server.pid,
                                 server.log_tail(20))
                    if self.on_death is not None:
                        self.on_death(server)
                self.restarting.add(server.url)
                thread = threading.Thread(target=self._restart, args=(server,), name=f"restart-{server.port}",
                                          daemon=True)
                self._threads[server.url] = thread
                thread.start()
        if wait:
            for thread in list(self._threads.values()):
                thread.join()

    def _restart(self, server: SGLangServer) -> None:
        try:
            server.restart()
        except ServerStartError as error:
            self.failures[server.url] = self.failures.get(server.url, 0) + 1
            logger.error("restart %d of %s failed: %s", self.failures[server.url], server.url, error)
            if self.failures[server.url] >= self.max_failures:
                self.given_up[server.url] = f"{self.failures[server.url]} restarts in a row failed: {error}"
                server.stop()
        else:
            self.failures[server.url] = 0
            self.restarts[server.url] = self.restarts.get(server.url, 0) + 1
            if self.on_restarted is not None:
                self.on_restarted(server)
        finally:
            self.restarting.discard(server.url)
            self._threads.pop(server.url, None)

    def start(self) -> "ServerSupervisor":
        import threading

        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sglang-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for thread in list(self._threads.values()):  # a restart in progress ends (healthy or not) first
            thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_once(wait=False)

    def __enter__(self) -> "ServerSupervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
