"""Real SGLang servers on tiny models for tests (CPU or GPU), built offline.

One server start costs ~15 s on an idle 2-core CPU (minutes on a busy one), so tests share servers per
module. Usage in a test module::

    from tests.sglang_fixtures import tiny_model_path, sglang_server  # noqa: F401  (pytest fixtures)

    def test_something(sglang_server):
        EngineControl(sglang_server.url).health()

``sglang_server`` is module-scoped (one server per module). Import the fixtures into a ``conftest.py``
rather than into several modules if the session-scoped ``tiny_model_path`` should be written once. Or
build a custom server with
:func:`tiny_model` / :func:`launch_server` inside a module-scoped fixture::

    @pytest.fixture(scope="module")
    def qwen_server(tmp_path_factory):
        path = tiny_model(tmp_path_factory.mktemp("qwen"), architecture="Qwen2ForCausalLM")
        with launch_server(path) as server:
            yield server
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import pytest

from alp_megatron.model.tiny import save_tiny_model
from alp_megatron.rollout.server import ServerConfig, SGLangServer, start_servers, stop_servers

# Context long enough for abort/pause tests to catch a request mid-generation.
TINY_CONTEXT = 1024
# KV pool and batch limits that keep a CPU server's memory small.
TEST_SERVER_ARGS: tuple[str, ...] = (
    "--max-total-tokens", "8192",
    "--max-running-requests", "16",
    "--context-length", str(TINY_CONTEXT),
    "--log-level", "warning",
)


def tiny_model(out_dir, architecture: str = "LlamaForCausalLM", seed: int = 0, **overrides) -> str:
    """Write the tiny fp32 test model (char tokenizer, context :data:`TINY_CONTEXT`) to ``out_dir``."""
    overrides.setdefault("max_position_embeddings", TINY_CONTEXT)
    return save_tiny_model(str(out_dir), architecture=architecture, seed=seed, **overrides)


def server_config(model_path: str, extra_args: Sequence[str] = (), **fields) -> ServerConfig:
    """A :class:`ServerConfig` for a test server: fp32 and small memory limits, plus ``extra_args``."""
    fields.setdefault("dtype", "float32")
    fields.setdefault("startup_timeout_s", 600.0)  # generous: CI machines may be heavily shared
    return ServerConfig(model_path=model_path, extra_args=TEST_SERVER_ARGS + tuple(extra_args), **fields)


@contextlib.contextmanager
def launch_server(model_path: str, extra_args: Sequence[str] = (), **fields) -> Iterator[SGLangServer]:
    """Start a healthy test server on ``model_path``; stop it (its whole process group) on exit."""
    server = SGLangServer(server_config(model_path, extra_args, **fields))
    try:
        server.start()
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def launch_servers(model_path: str, count: int, extra_args: Sequence[str] = (),
                   log_dir: Optional[str] = None, **fields) -> Iterator[list[SGLangServer]]:
    """Start ``count`` test servers at once on ``model_path``; stop them all on exit."""
    configs = [server_config(model_path, extra_args, log_dir=log_dir, **fields) for _ in range(count)]
    servers = start_servers(configs)
    try:
        yield servers
    finally:
        stop_servers(servers)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The tiny Llama (seed 0), written once per test session."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def sglang_server(tiny_model_path) -> Iterator[SGLangServer]:
    """One healthy server on :func:`tiny_model_path`, shared by the tests of a module."""
    with launch_server(tiny_model_path, log_dir=os.path.join(os.path.dirname(tiny_model_path), "logs")) as server:
        yield server


MOE_ROUTES = (2, 2, 4)
"""The tiny Qwen3-MoE's (decoder layers, experts per token, experts)."""


@pytest.fixture(scope="session")
def moe_model_path(tmp_path_factory) -> str:
    """The tiny Qwen3-MoE (seed 0; every layer MoE, 4 experts, top-2), written once per test session."""
    return tiny_model(tmp_path_factory.mktemp("tiny-qwen3-moe"), architecture="Qwen3MoeForCausalLM")


@pytest.fixture(scope="session")
def moe_server(moe_model_path) -> Iterator[SGLangServer]:
    """One server on :func:`moe_model_path` that returns routed experts, shared by the whole session (import
    it into the ``conftest.py`` of the tests that need it)."""
    with launch_server(moe_model_path, ("--enable-return-routed-experts",),
                       log_dir=os.path.join(os.path.dirname(moe_model_path), "logs")) as server:
        yield server
