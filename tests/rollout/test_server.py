"""Server launch config, control calls on a real SGLang server, and a stop that leaves no process and no
shared-memory file behind."""

import os
import signal
import socket
import sys
import time

import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.errors import EngineError, EngineUnreachableError
from alp_megatron.rollout.process import ManagedService, free_port, group_running, group_shared_memory
from alp_megatron.rollout.server import ServerConfig, ServerSupervisor, SGLangServer
from tests.sglang_fixtures import server_config


def test_server_answers_health_model_info_and_weight_version(rollout_server, model_dirs):
    control = EngineControl(rollout_server.url)
    assert rollout_server.is_alive()
    assert control.health() is True
    info = control.model_info()
    assert info["architectures"] == ["LlamaForCausalLM"]
    assert control.weight_version() == "v0"
    assert info["model_path"] in (model_dirs["v0"], model_dirs["v1"])  # the weights test may be mid-way
    control.flush_cache()


def test_error_names_url_endpoint_and_sglang_message(rollout_server):
    control = EngineControl(rollout_server.url)
    with pytest.raises(EngineError) as caught:
        control.update_weights_from_disk("/no/such/checkpoint")
    text = str(caught.value)
    assert rollout_server.url in text and "/update_weights_from_disk" in text
    assert caught.value.status == 400 and caught.value.message
    assert control.weight_version() == "v0"  # the refused update changed nothing


def test_unreachable_server_error_names_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineUnreachableError) as caught:
        EngineControl(url, timeout_s=5).health()
    assert url in str(caught.value) and "/health" in str(caught.value)


def test_stop_ends_the_whole_process_group_and_leaves_nothing_in_shared_memory(second_server):
    pid = second_server.pid
    assert group_running(pid) and EngineControl(second_server.url).health()
    used = [path for path in group_shared_memory(pid) if os.path.basename(path).startswith("sglang_loads_")]
    assert used  # its load-snapshot file
    second_server.stop()
    assert not second_server.is_alive()
    assert not group_running(pid)
    with pytest.raises(EngineUnreachableError):
        EngineControl(second_server.url, timeout_s=5).health()
    assert not [path for path in used if os.path.exists(path)]
    with open(second_server.log_path, errors="replace") as log:
        this_run = log.read().rsplit("\n==== ", 1)[-1]
    assert "crashed" not in this_run and "SIGQUIT" not in this_run, this_run[-2000:]  # a stop, not a crash


def test_a_picked_port_taken_before_the_server_binds_it_moves_the_first_start_to_another(model_dirs, tmp_path,
                                                                                       monkeypatch):
    """Another process takes the port picked for a server while the server loads its model (seen: a second
    server's gloo listener): the start is made again on another port instead of waiting out the timeout."""
    import alp_megatron.rollout.server as server_module

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # listens, never answers
        holder.bind(("127.0.0.1", 0))
        holder.listen(16)
        taken = holder.getsockname()[1]
        picks = iter([taken])
        real_free_port = server_module.free_port
        monkeypatch.setattr(server_module, "free_port", lambda host: next(picks, None) or real_free_port(host))
        server = SGLangServer(server_config(model_dirs["v0"], log_dir=str(tmp_path)))
        try:
            server.start()
            first_group = server.pid
            server.wait_healthy()
            assert server.port != taken and EngineControl(server.url).health()
            assert not group_running(first_group)  # the first launch was stopped, not left behind
            with open(tmp_path / f"sglang-{taken}.log", errors="replace") as log:
                assert "address already in use" in log.read()
        finally:
            server.stop()


@pytest.mark.parametrize("fields, field_name", [
    (dict(host="0.0.0.0"), "host"),
    (dict(port=70000), "port"),
    (dict(tp_size=0), "tp_size"),
    (dict(dtype="fp7"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(mem_fraction=1.5), "mem_fraction"),
    (dict(extra_args=("--port", "1")), "extra_args"),
    (dict(extra_args=("--base-gpu-id", "1")), "extra_args"),
    (dict(base_gpu_id=-1), "base_gpu_id"),
    (dict(model_path="/no/such/model"), "model_path"),
])
def test_config_errors_name_the_field(fields, field_name, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**{"model_path": str(tmp_path), **fields})
    assert caught.value.field == field_name


def test_non_loopback_host_is_allowed_with_api_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = ServerConfig(model_path=str(tmp_path), host="0.0.0.0", api_key="secret")
    assert config.api_key == "secret"


def test_launched_servers_sit_side_by_side_on_their_own_gpus(tmp_path):
    """Each launched server gets its own GPUs: from GPU 0 when colocated (shared with the trainer), after the
    trainer's GPUs when disaggregated; a placement past the visible GPUs names the field; no flag without
    GPUs."""
    from alp_megatron.config import RolloutSection
    from alp_megatron.rollout.fleet import launched_server_gpus

    colocated = RolloutSection(mode="colocated", servers=4, server_tp_size=2)
    assert launched_server_gpus(colocated, trainer_gpus_on_node=8, visible_gpus=8) == [0, 2, 4, 6]
    disaggregated = RolloutSection(mode="disaggregated", servers=2, server_tp_size=2)
    assert launched_server_gpus(disaggregated, trainer_gpus_on_node=4, visible_gpus=8) == [4, 6]
    with pytest.raises(ConfigError) as caught:
        launched_server_gpus(disaggregated, trainer_gpus_on_node=6, visible_gpus=8)
    assert caught.value.field == "rollout.servers" and "up to 9" in str(caught.value)
    placed = RolloutSection(mode="disaggregated", servers=1, server_tp_size=2, server_first_gpu=1)
    assert launched_server_gpus(placed, trainer_gpus_on_node=8, visible_gpus=8) == [1]
    assert launched_server_gpus(colocated, trainer_gpus_on_node=2, visible_gpus=0) == [None] * 4
    (tmp_path / "config.json").write_text("{}")
    on_gpu = SGLangServer(ServerConfig(model_path=str(tmp_path), device="cuda", base_gpu_id=6))
    assert on_gpu.command()[on_gpu.command().index("--base-gpu-id") + 1] == "6"
    assert "--base-gpu-id" not in SGLangServer(ServerConfig(model_path=str(tmp_path), device="cpu",
                                                            base_gpu_id=6)).command()


def test_serve_stopped_while_starting_exits_at_once_leaving_no_process(model_dirs, tmp_path):
    """``alp_megatron.rollout.serve`` takes SIGTERM during the server's start: it stops the launch and exits
    at once. The launcher runs with SIGTERM and SIGINT deliverable (a child inherits its parent's signal
    mask, so signals must not be held back around the launch)."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from alp_megatron.rollout.process import session_leading_children

    serve = subprocess.Popen([sys.executable, "-m", "alp_megatron.rollout.serve", "--model-path", model_dirs["v0"],
                              "--port", "0", "--log-dir", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        launchers, deadline = [], time.monotonic() + 120
        while not launchers and time.monotonic() < deadline and serve.poll() is None:
            launchers = session_leading_children(serve.pid)
            time.sleep(0.05)
        assert launchers, serve.communicate(timeout=30)
        with open(f"/proc/{launchers[0]}/status") as status:
            blocked = int(re.search(r"SigBlk:\s*([0-9a-f]+)", status.read()).group(1), 16)
        assert not blocked & ((1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))), hex(blocked)
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0 and "stopped while the server was starting" in err, err[-2000:]
    assert not group_running(launchers[0])


def test_a_tied_checkpoint_of_an_architecture_sglang_never_ties_is_refused():
    """SGLang 0.5.23's Qwen3-MoE builds its own lm_head whatever tie_word_embeddings says: a tied checkpoint
    would be served with an untrained output layer (measured: a tied tiny Qwen3-MoE's engine logprobs were
    1.7 nats from the trainer's after the first weight sync)."""
    from alp_megatron.rollout.server import check_servable

    with pytest.raises(ConfigError, match="never ties its lm_head") as error:
        check_servable("Qwen3MoeForCausalLM", tied_embeddings=True)
    assert error.value.field == "model.hf_path"
    check_servable("Qwen3MoeForCausalLM", tied_embeddings=False)
    check_servable("LlamaForCausalLM", tied_embeddings=True)


class _HttpService(ManagedService):
    """A real process serving HTTP (``python -m http.server``), restarted like a server; ``broken`` makes every
    later start exit at once (a server that cannot come back)."""

    kind = "http service"
    health_path = "/"
    startup_timeout_s = 20.0

    def __init__(self, root):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(str(root), f"http-{self.port}.log")
        self.broken = False

    def command(self):
        if self.broken:
            return [sys.executable, "-c", "raise SystemExit('cannot start')"]
        return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1"]

    def restart(self):
        self.stop()
        self.start()
        return self.wait_healthy()


def test_the_supervisor_restarts_side_by_side_and_gives_up_a_server_that_cannot_come_back(tmp_path):
    healthy, broken = _HttpService(tmp_path), _HttpService(tmp_path)
    for service in (healthy, broken):
        service.start()
        service.wait_healthy()
    deaths, back = [], []
    supervisor = ServerSupervisor([healthy, broken], interval_s=0.2, on_death=lambda s: deaths.append(s.url),
                                  on_restarted=lambda s: back.append(s.url), max_failures=2)
    try:
        with supervisor:
            broken.broken = True
            first_pids = (healthy.pid, broken.pid)
            for pid in first_pids:
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while (supervisor.restarts[healthy.url] < 1 or broken.url not in supervisor.given_up) \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
        assert supervisor.restarts == {healthy.url: 1, broken.url: 0}
        assert sorted(deaths) == sorted([healthy.url, broken.url])  # each death reported once, before its restart
        assert back == [healthy.url] and healthy.pid not in first_pids and healthy.is_alive()
        assert "2 restarts in a row failed" in supervisor.given_up[broken.url]
        assert "cannot start" in supervisor.given_up[broken.url]  # the log tail says why
        assert not supervisor.restarting and supervisor.dead() == []
    finally:
        healthy.stop()
        broken.stop()


def test_an_update_to_an_engine_that_died_mid_update_is_retried_on_its_replacement(second_server, model_dirs):
    """The run's weight update (TrainerWeightSync, here on a one-rank gloo group): the engine is SIGKILLed after
    the first bucket went out; before the retry the supervisor restarts it (what the fleet's recover_now does),
    and the retry loads every bucket into the replacement, which then serves exactly the new weights."""
    import torch.distributed as dist

    from alp_megatron.bridge.export import bucketed
    from alp_megatron.bridge.weight_update import TrainerWeightSync
    from alp_megatron.config import WeightSyncSection
    from tests.bridge.test_transports import HFReference, load_tensors, max_logprob_diff

    tensors = load_tensors(model_dirs["v1"])
    killed = []

    class Exporter:  # the policy's side of an update: buckets of HF-named tensors, a fresh stream per attempt
        def hf_buckets(self, bucket_bytes):
            for index, bucket in enumerate(bucketed(tensors.items(), bucket_bytes)):
                yield bucket
                if index == 0 and not killed:  # the first attempt: the engine dies with one bucket loaded
                    killed.append(second_server.pid)
                    os.killpg(second_server.pid, signal.SIGKILL)
                    time.sleep(0.5)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    try:
        sync = TrainerWeightSync(WeightSyncSection(bucket_bytes=2**16, retries=1), [second_server.url], [1])
        supervisor = ServerSupervisor([second_server])
        try:
            metrics = sync.update(Exporter(), "v-after-death", before_retry=supervisor.check_once)
        finally:
            sync.close()
    finally:
        dist.destroy_process_group()
    assert killed and metrics["sync_attempts"] == 2.0 and supervisor.restarts[second_server.url] == 1
    assert second_server.pid != killed[0] and not group_running(killed[0])
    assert EngineControl(second_server.url).weight_version() == "v-after-death"
    assert max_logprob_diff(second_server.url, HFReference(model_dirs["v1"])) <= 1e-4
