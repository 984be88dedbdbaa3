"""A rank that follows its launcher (alp_megatron/launcher_watch.py), here without torchrun: a plain parent
process stands in for the launcher."""

import json
import signal
import subprocess
import sys
import time

from tests.processes import running, wait_gone

# The "launcher" starts the rank and waits to be killed; the rank watches it and blocks in a lock wait, as a
# rank waiting for a rollout does. It reports what it saw as one JSON line in its log.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(rank.pid, flush=True)
time.sleep(600)
"""
RANK = """
import json, os, signal, sys, threading
from alp_megatron.launcher_watch import LauncherGone, LauncherWatch
log = open(sys.argv[1], "a")
seen = []
signal.signal(signal.SIGUSR1, lambda *_: seen.append("usr1"))
watch = LauncherWatch(os.getppid(), interval_s=0.1, grace_s=5.0).start()
os.kill(os.getpid(), signal.SIGUSR1)  # not the watch's: the handler that was there before takes it
print(json.dumps({"ready": seen}), file=log, flush=True)
try:
    threading.Event().wait()  # blocked, as in Future.result()
except LauncherGone as error:
    print(json.dumps({"interrupted": str(error), "gone": watch.launcher_gone()}), file=log, flush=True)
    watch.disarm()
    sys.exit(3)
"""


def test_a_rank_whose_launcher_dies_is_interrupted_and_exits(tmp_path):
    log = tmp_path / "rank.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(log)], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    rank = int(launcher.stdout.readline())
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(log.read_text().splitlines()[0]) == {"ready": ["usr1"]}
    assert running(rank)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert wait_gone([rank], 10) == []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[1]["gone"] and "is gone" in lines[1]["interrupted"]
