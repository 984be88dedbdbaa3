"""A real single-node Slurm (Debian's slurmctld, slurmd, munge) for the launch tests.

Installs the packages with apt when they are missing (root only), writes a slurm.conf into a scratch
directory, starts munged, slurmctld and slurmd, waits until the node is idle, and stops exactly the
processes it started (by PID). No cgroups, no systemd: proctrack/linuxproc and task/none.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(Exception):
    """Why no Slurm cluster can run here (reported as the test's skip reason)."""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")) or \
            (shutil.which("slurmctld") and os.path.exists("/usr/sbin/munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = _run(["apt-get", "update", "-qq"], env=env, timeout=300)
    result = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env, timeout=600)
    if result.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {update.stderr[-500:]} "
                               f"{result.stderr[-1500:]}")


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections of a cluster stopped just before, in TIME_WAIT, do not count:
    the daemons bind with SO_REUSEADDR too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class SlurmCluster:
    """``nodes`` > 1 emulates that many nodes on this host (one slurmd per node, ``slurmd -N``), each
    with the host's cores, for scripts that place work on distinct nodes."""

    def __init__(self, scratch: str, nodes: int = 1):
        self.scratch = scratch
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [self.host] if nodes == 1 else [f"{self.host}n{i}" for i in range(1, nodes + 1)]
        self.conf = os.path.join(scratch, "etc", "slurm.conf")
        self.pids: list[int] = []
        self.munged_pid: Optional[int] = None
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self) -> "SlurmCluster":
        install()
        for port in (6817, 6818, *self._node_ports()):
            if not _port_free(port):
                raise SlurmUnavailable(f"port {port} is taken (another Slurm is running here)")
        for sub in ("etc", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.scratch, sub), exist_ok=True)
        self._start_munge()
        self._write_conf()
        log = lambda name: open(os.path.join(self.scratch, "log", name), "w")  # noqa: E731
        controller = subprocess.Popen(["slurmctld", "-D", "-c", "-f", self.conf], stdin=subprocess.DEVNULL,
                                      stdout=log("slurmctld.stdout"), stderr=subprocess.STDOUT, env=self.env)
        self.pids.append(controller.pid)
        self._wait(lambda: "is UP" in _run(["scontrol", "ping"], env=self.env).stdout, "slurmctld to answer")
        for name in self.node_names:
            named = [] if name == self.host else ["-N", name]
            node = subprocess.Popen(["slurmd", "-D", "-f", self.conf, *named], stdin=subprocess.DEVNULL,
                                    stdout=log(f"slurmd-{name}.stdout"), stderr=subprocess.STDOUT, env=self.env)
            self.pids.append(node.pid)
        nodes = ",".join(self.node_names)
        self._wait(lambda: set(_run(["sinfo", "-h", "-N", "-n", nodes, "-o", "%T"], env=self.env).stdout.split())
                   == {"idle"}, "the nodes to be idle")
        for pid in self.pids:
            os.kill(pid, 0)  # still ours and alive (a second cluster on the same ports dies quietly)
        return self

    def _start_munge(self) -> None:
        if not os.path.isfile("/etc/munge/munge.key") or os.path.getsize("/etc/munge/munge.key") == 0:
            _run(["mungekey", "--create", "--force"], check=True)
        for path in ("/etc/munge", "/etc/munge/munge.key", "/var/lib/munge", "/var/log/munge"):
            shutil.chown(path, "munge", "munge")
        os.chmod("/etc/munge/munge.key", 0o400)
        if os.path.exists("/var/log/munge/munged.log"):
            shutil.chown("/var/log/munge/munged.log", "munge", "munge")
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if _run(["munge", "-n"]).returncode == 0 and os.path.exists("/run/munge/munged.pid"):
            return  # a munged is already serving; it is not ours to stop
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        with open("/run/munge/munged.pid") as handle:
            self.munged_pid = int(handle.read().strip())

    def _node_ports(self) -> list[int]:
        return [] if self.node_names == [self.host] else [6820 + i for i in range(len(self.node_names))]

    def _node_lines(self, topology: str, memory: int) -> list[str]:
        if self.node_names == [self.host]:
            return [f"NodeName={self.host} NodeAddr=127.0.0.1 {topology} RealMemory={memory} State=UNKNOWN"]
        share = memory // len(self.node_names)
        return [f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} {topology} "
                f"RealMemory={share} State=UNKNOWN" for name, port in zip(self.node_names, self._node_ports())]

    def _write_conf(self) -> None:
        host = self.host
        memory = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) // 1024 - 1024
        node = _run(["slurmd", "-C"]).stdout.splitlines()[0].split()
        topology = " ".join(field for field in node if field.split("=")[0] in
                            ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"))
        s = self.scratch
        lines = [
            "ClusterName=ci", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", "MpiDefault=none", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MailProg=/bin/true", "EnforcePartLimits=ALL",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={s}/log/jobcomp.txt", "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", f"StateSaveLocation={s}/state", f"SlurmdSpoolDir={s}/spool/%n",
            f"SlurmctldPidFile={s}/run/slurmctld.pid", f"SlurmdPidFile={s}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log", f"SlurmdLogFile={s}/log/slurmd-%n.log",
            *self._node_lines(topology, memory),
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def _wait(self, ready, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out waiting for {what}; logs in {self.scratch}/log")

    def sbatch(self, script: str, *options: str, env: Optional[dict] = None) -> int:
        result = _run(["sbatch", "--parsable", *options, script], env={**self.env, **(env or {})}, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def wait_job(self, job_id: int, timeout: float) -> dict:
        """Wait until the job leaves the queue; return its final fields from `scontrol show job`."""
        deadline = time.monotonic() + timeout
        while _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], env=self.env).stdout.strip():
            if time.monotonic() > deadline:
                _run(["scancel", str(job_id)], env=self.env)
                raise TimeoutError(f"job {job_id} still running after {timeout} s")
            time.sleep(1.0)
        text = _run(["scontrol", "show", "job", str(job_id)], env=self.env).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def stop(self) -> None:
        pids = self.pids + ([self.munged_pid] if self.munged_pid else [])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.2)
