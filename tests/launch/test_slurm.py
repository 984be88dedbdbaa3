"""The Slurm launch scripts really run, on a Slurm started here that emulates two nodes on this host: the
CPU config to the end with launch/slurm_train.sbatch on one node, and with launch/slurm_disaggregated.sbatch
SGLang and the router on one node and the trainer on the other."""

import os
import sys

import pytest

from alp_megatron.run.metrics import read_metrics
from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.run.test_rl_loop import REPO, SMALL

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), nodes=2)
    try:
        cluster.start()
    except SlurmUnavailable as reason:
        cluster.stop()
        pytest.skip(f"no single-node Slurm here: {reason}")
    yield cluster
    cluster.stop()


def free_ports_near(port: int) -> set:
    """The ports next to ``port`` that nothing uses."""
    import socket

    free = set()
    for candidate in (port - 1, port + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
                free.add(candidate)
            except OSError:
                pass
    return free


def test_sbatch_runs_the_cpu_config(slurm, tmp_path):
    out = tmp_path / "run"
    env = {"CONFIG": os.path.join(REPO, "examples", "cpu_tiny.yaml"), "OUTPUT_DIR": str(out),
           "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           # one step without warm start: the loop itself is tested in test_rl_loop
           "ALP_OVERRIDES": " ".join([*SMALL, "run.steps=1", "model.tiny_warm_start_steps=0"])}
    job = slurm.sbatch(os.path.join(REPO, "launch", "slurm_train.sbatch"), "--nodes=1", "--cpus-per-task=2",
                       f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", env=env)
    info = slurm.wait_job(job, timeout=1500)
    log = open(f"{tmp_path}/slurm-{job}.out").read()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", log[-4000:]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0]
    assert records[-1]["weight_version"] == 1


def test_disaggregated_sbatch_serves_on_one_node_and_trains_on_the_other(slurm, tmp_path):
    from alp_megatron.model.warm_start import ensure_warm_started_model
    from alp_megatron.rollout.process import free_ports

    model = ensure_warm_started_model(str(tmp_path / "base_model"), "rev4", 0, seed=0, num_layers=2)
    out = tmp_path / "run"
    server_port, rdzv_port = free_ports(2)
    router_port = next(port for port in free_ports(20) if port + 1 in free_ports_near(port))  # metrics on +1
    env = {"CONFIG": os.path.join(REPO, "examples", "cpu_tiny.yaml"), "OUTPUT_DIR": str(out),
           "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "MODEL_PATH": model,
           "API_KEY": "slurm-test-key", "SERVER_TP": "1", "SERVER_PORT": str(server_port),
           "ROUTER_PORT": str(router_port), "RDZV_PORT": str(rdzv_port),
           "SERVER_ARGS": "--max-total-tokens 8192 --max-running-requests 8",
           # the transport of disaggregated runs (gloo here, NCCL on GPUs). (With `tensor` on CPU the trainer's
           # torch_shm_manager, which the server stays connected to, holds the step's stderr, and srun waits
           # 60 s for it after the trainer exits.)
           "ALP_OVERRIDES": " ".join(["run.steps=2", "weight_sync.transport=distributed", *SMALL])}
    job = slurm.sbatch(os.path.join(REPO, "launch", "slurm_disaggregated.sbatch"), "--nodes=2",
                       "--cpus-per-task=2", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", env=env)
    info = slurm.wait_job(job, timeout=1500)
    log = open(f"{tmp_path}/slurm-{job}.out").read()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", log[-4000:]
    rollout_node, train_node = slurm.node_names
    assert f"trainer: 1 node(s) x 2 ranks on {train_node}" in log
    assert os.path.exists(tmp_path / f"alp-disagg-{job}-sglang-{rollout_node}-{env['SERVER_PORT']}.out")
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1]
    assert records[-1]["weight_version"] == 2


def test_disaggregated_sbatch_checks_the_config_before_any_server_starts(slurm, tmp_path):
    env = {"CONFIG": os.path.join(REPO, "examples", "cpu_tiny.yaml"), "OUTPUT_DIR": str(tmp_path / "run"),
           "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "MODEL_PATH": str(tmp_path), "API_KEY": "slurm-test-key",
           "SERVER_TP": "1", "ALP_OVERRIDES": "rollout.sampling.temprature=1.0"}
    job = slurm.sbatch(os.path.join(REPO, "launch", "slurm_disaggregated.sbatch"), "--nodes=2",
                       f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", env=env)
    info = slurm.wait_job(job, timeout=300)
    log = open(f"{tmp_path}/slurm-{job}.out").read()
    assert info.get("JobState") == "FAILED", log[-4000:]
    assert "config field 'rollout.sampling.temprature': is not a known setting" in log
    assert not [name for name in os.listdir(tmp_path) if "sglang" in name]  # no server was started
