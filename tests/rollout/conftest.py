"""Servers shared by every test of tests/rollout: two real SGLang servers on the tiny Llama, started
together once (a start costs ~15-40 s on 2 CPU cores), and a second tiny model for weight updates.

``rollout_server`` is the one most tests use; ``second_server`` is the one the router test kills and the
server test stops (it is started again if an earlier test left it stopped).
"""

import pytest

from alp_megatron.rollout.client import ClientConfig, model_vocab_size
from tests.sglang_fixtures import launch_servers, tiny_model


@pytest.fixture(scope="package")
def model_dirs(tmp_path_factory) -> dict:
    """``{"v0": tiny Llama seed 0, "v1": the same shape with seed 1}``."""
    root = tmp_path_factory.mktemp("rollout-models")
    return {"v0": tiny_model(root / "seed0", seed=0), "v1": tiny_model(root / "seed1", seed=1)}


@pytest.fixture(scope="package")
def servers(model_dirs, tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("rollout-logs"))
    with launch_servers(model_dirs["v0"], 2, log_dir=log_dir) as started:
        yield started


@pytest.fixture
def rollout_server(servers):
    return servers[0]


@pytest.fixture
def second_server(servers):
    server = servers[1]
    if not server.is_alive():
        server.restart()
    return server


@pytest.fixture
def client_config(rollout_server, model_dirs) -> ClientConfig:
    return ClientConfig(urls=[rollout_server.url], vocab_size=model_vocab_size(model_dirs["v0"]))
