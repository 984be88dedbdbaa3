"""One SGLang server shared by the bridge's server-backed tests (a start costs 20-40 s on 2 CPU cores): it
serves the tiny Llama of seed 0, and each test pushes the weights it checks (the tiny Llama of another seed)
before checking anything, so no test depends on what an earlier one left loaded."""

import pytest

from tests.sglang_fixtures import launch_server, tiny_model


@pytest.fixture(scope="package")
def models(tmp_path_factory):
    """Tiny Llamas of seeds 0 (served at start) to 3, the same shape."""
    root = tmp_path_factory.mktemp("bridge-models")
    return {seed: tiny_model(root / f"seed{seed}", seed=seed) for seed in (0, 1, 2, 3)}


@pytest.fixture(scope="package")
def server(models, tmp_path_factory):
    with launch_server(models[0], log_dir=str(tmp_path_factory.mktemp("bridge-logs"))) as server:
        yield server
