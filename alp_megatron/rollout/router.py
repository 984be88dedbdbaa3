"""``sglang-router`` in front of SGLang workers (``python -m sglang_router.launch_router``).

The router proxies ``/generate`` (and fans ``/flush_cache`` out); it does not proxy pause, continue or
weight updates, which go to each worker (``RolloutClient(control_urls=...)``, ``EngineControl``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import requests

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.errors import ServerStartError
from alp_megatron.rollout.process import ManagedProcess, ManagedService, base_url, free_port, is_loopback

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "cache_aware", "power_of_two", "random")


@dataclass(frozen=True)
class RouterConfig:
    """How to launch the router: its workers, routing ``policy``, address (``port=0`` picks a free one).

    ``health_check_interval_s`` is how often the router probes workers (a dead one stops receiving
    requests after a failed probe and gets them again once healthy).
    """

    worker_urls: Sequence[str]
    policy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 0
    api_key: Optional[str] = None
    health_check_interval_s: int = 2
    extra_args: Sequence[str] = field(default_factory=tuple)
    log_dir: Optional[str] = None
    startup_timeout_s: float = 120.0

    def __post_init__(self):
        object.__setattr__(self, "worker_urls", tuple(self.worker_urls))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not self.worker_urls:
            raise ConfigError("router.worker_urls", "is empty", "give the URL of every SGLang worker")
        if self.policy not in POLICIES:
            raise ConfigError("router.policy", f"{self.policy!r} is unknown", f"use one of {POLICIES}")
        if not (0 <= self.port <= 65535):
            raise ConfigError("router.port", f"{self.port!r} is not a TCP port", "use 1..65535, or 0 for a free one")
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError("router.host", f"{self.host!r} accepts other machines but api_key is not set",
                              "set router.api_key or bind to 127.0.0.1")
        if self.health_check_interval_s < 1:
            raise ConfigError("router.health_check_interval_s", f"{self.health_check_interval_s!r} < 1",
                              "use whole seconds, at least 1")


class SGLangRouter(ManagedService):
    """One ``sglang-router`` process in its own process group; ``start()``, ``wait_healthy()`` (``GET
    /readiness``: its workers are registered and healthy), ``stop()``."""

    kind = "sglang-router"
    health_path = "/readiness"
    stop_timeout_s = 10.0

    def __init__(self, config: RouterConfig):
        self.config = config
        self.startup_timeout_s = config.startup_timeout_s
        host = config.host if config.host != "localhost" else "127.0.0.1"
        self._port = config.port or free_port(host)
        # The router also serves Prometheus metrics, by default on 29000 for every router: a second router on
        # the host would fail to start. Each gets a free port of its own unless extra_args names one.
        self._metrics_port = None
        if "--prometheus-port" not in {arg.split("=", 1)[0] for arg in config.extra_args}:
            self._metrics_port = free_port(host)
            while self._metrics_port == self._port:
                self._metrics_port = free_port(host)
        self._log_dir = config.log_dir or tempfile.mkdtemp(prefix="alp-router-")
        self._process: Optional[ManagedProcess] = None

    @property
    def url(self) -> str:
        return base_url(self.config.host, self._port)

    @property
    def log_path(self) -> str:
        return os.path.join(self._log_dir, f"router-{self._port}.log")

    def command(self) -> list[str]:
        cfg = self.config
        cmd = [
            sys.executable, "-m", "sglang_router.launch_router",
            "--worker-urls", *cfg.worker_urls,
            "--policy", cfg.policy, "--host", cfg.host, "--port", str(self._port),
            "--health-check-interval-secs", str(cfg.health_check_interval_s),
            "--log-level", "warn",
        ]
        if cfg.api_key:
            cmd += ["--api-key", cfg.api_key]
        if self._metrics_port is not None:
            cmd += ["--prometheus-port", str(self._metrics_port)]
        return cmd + list(cfg.extra_args)

    def _headers(self) -> Optional[dict]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else None

    def workers(self) -> list:
        """The router's view of its workers (``GET /workers``)."""
        answer = requests.get(self.url + "/workers", headers=self._headers(), timeout=10)
        answer.raise_for_status()
        body = answer.json()
        return body.get("workers", body) if isinstance(body, dict) else body

    def remove_worker(self, url: str, timeout: float = 30.0) -> None:
        """Stop routing to worker ``url`` (``DELETE /workers/{id}``, applied in the background by the router:
        this waits until it is gone). A server restarted after a crash serves its starting weights; it must
        receive no request until it holds the run's current ones."""
        for worker in self.workers():
            if worker.get("url", "").rstrip("/") == url.rstrip("/"):
                answer = requests.delete(f"{self.url}/workers/{worker['id']}", headers=self._headers(), timeout=10)
                answer.raise_for_status()
        self._wait_workers(lambda urls: url.rstrip("/") not in urls, f"{url} to leave", timeout)

    def add_worker(self, url: str, timeout: float = 60.0) -> None:
        """Route to worker ``url`` again (``POST /workers``); waits until the router reports it healthy."""
        answer = requests.post(self.url + "/workers", json={"url": url}, headers=self._headers(), timeout=10)
        answer.raise_for_status()
        self._wait_workers(lambda urls: urls.get(url.rstrip("/")) is True, f"{url} to join", timeout)

    def _wait_workers(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            urls = {w.get("url", "").rstrip("/"): bool(w.get("is_healthy")) for w in self.workers()}
            if done(urls):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(self.kind, self.url, f"did not apply the change (waited {timeout:.0f} s for "
                                       f"worker {what}; its workers: {urls})", self.log_path, self.log_tail(20))
            time.sleep(0.2)
