"""launch/slurm_train.sbatch really runs: a single-node Slurm (started here) runs the CPU config to the end."""

import os
import sys

import pytest

from alp_megatron.trainer.metrics import read_metrics
from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.trainer.test_rl_loop import REPO, SMALL

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except SlurmUnavailable as reason:
        cluster.stop()
        pytest.skip(f"no single-node Slurm here: {reason}")
    yield cluster
    cluster.stop()


def test_sbatch_runs_the_cpu_config(slurm, tmp_path):
    out = tmp_path / "run"
    env = {"CONFIG": os.path.join(REPO, "examples", "cpu_tiny.yaml"), "OUTPUT_DIR": str(out),
           "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "ALP_OVERRIDES": " ".join(["run.steps=2", *SMALL])}
    job = slurm.sbatch(os.path.join(REPO, "launch", "slurm_train.sbatch"), "--nodes=1", "--cpus-per-task=2",
                       f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", env=env)
    info = slurm.wait_job(job, timeout=1500)
    log = open(f"{tmp_path}/slurm-{job}.out").read()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", log[-4000:]
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1]
    assert records[-1]["weight_version"] == 2
