"""Launched process groups stop when their launcher dies, however it dies (alp_megatron.rollout.reaper)."""

import json
import os
import signal
import subprocess
import sys
import time

from alp_megatron.rollout import reaper
from alp_megatron.rollout.process import group_running, session_leading_children
from tests.processes import wait_gone

# A launcher: starts two groups through ManagedProcess (each a sleeper with a child of its own, one holding a
# file in /dev/shm that only the reaper can know of), optionally stops the second, prints what it made, and
# waits to be killed.
LAUNCHER = """
import json, os, sys, time
from alp_megatron.rollout import reaper
from alp_megatron.rollout.process import ManagedProcess
shm = sys.argv[2]
holder = ("import os, sys, subprocess, time\\n"
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\\n"
          "handle = open(sys.argv[1], 'w') if len(sys.argv) > 1 else None\\n"
          "time.sleep(600)\\n")
first = ManagedProcess("first", [sys.executable, "-c", holder, shm], dict(os.environ), sys.argv[1] + "/first.log",
                       shared_memory_prefixes=("alp_reaper_test_",))
first.start()
second = ManagedProcess("second", [sys.executable, "-c", holder], dict(os.environ), sys.argv[1] + "/second.log")
second.start()
if sys.argv[3] == "kill-reaper":  # a reaper that dies is replaced, and the new one learns both groups
    os.kill(reaper.pid(), 9)
    while os.path.exists(f"/proc/{reaper.pid()}") and open(f"/proc/{reaper.pid()}/stat").read().split()[2] != "Z":
        time.sleep(0.01)
    third = ManagedProcess("third", [sys.executable, "-c", holder], dict(os.environ), sys.argv[1] + "/third.log")
    third.start()
if sys.argv[3] == "stop-second":
    second.stop()
while not os.path.exists(shm):
    time.sleep(0.01)
print(json.dumps({"groups": [first.pid, second.pid], "reaper": reaper.pid()}), flush=True)
time.sleep(600)
"""


def _launch(tmp_path, mode):
    shm = f"/dev/shm/alp_reaper_test_{os.getpid()}_{mode}"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), shm, mode], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    made = json.loads(launcher.stdout.readline())
    return launcher, made, shm


def test_a_killed_launcher_leaves_no_group_and_no_shared_memory_file(tmp_path):
    launcher, made, shm = _launch(tmp_path, "kill-launcher")
    groups = made["groups"]
    assert all(group_running(group) for group in groups) and os.path.exists(shm)
    assert sorted(session_leading_children(launcher.pid)) == sorted(groups)  # the reaper is not a launch
    launcher.kill()  # SIGKILL: nothing of the launcher runs after this
    launcher.wait()
    started = time.monotonic()
    while any(group_running(group) for group in groups) and time.monotonic() - started < 15:
        time.sleep(0.05)
    assert not [group for group in groups if group_running(group)], "a group outlived its launcher by 15 s"
    assert wait_gone([made["reaper"]], 10) == []  # the reaper is gone too, once it has cleaned up:
    assert not os.path.exists(shm)  # the shared-memory file unlinked, as ManagedProcess.stop would


def test_a_group_its_launcher_stopped_is_forgotten(tmp_path):
    launcher, made, shm = _launch(tmp_path, "stop-second")
    first, second = made["groups"]
    assert not group_running(second)
    launcher.kill()
    launcher.wait()
    assert wait_gone([made["reaper"]], 15) == []
    assert not group_running(first)


def test_a_reaper_that_died_is_replaced_and_knows_every_group(tmp_path):
    launcher, made, shm = _launch(tmp_path, "kill-reaper")
    assert made["reaper"] is not None and reaper.is_reaper(made["reaper"])
    launcher.kill()
    launcher.wait()
    assert wait_gone([made["reaper"]], 15) == []
    assert not any(group_running(group) for group in made["groups"])


def test_a_launcher_that_exits_cleanly_takes_its_reaper_along(tmp_path):
    script = ("import os, sys\n"
              "from alp_megatron.rollout import reaper\n"
              "from alp_megatron.rollout.process import ManagedProcess\n"
              "p = ManagedProcess('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'], dict(os.environ),"
              " sys.argv[1])\n"
              "p.start(); p.stop(); print(reaper.pid(), p.pid)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sleeper.log")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reaper_pid, group = map(int, result.stdout.split())
    assert wait_gone([reaper_pid], 10) == [] and not group_running(group)
    assert "stopping process group" not in result.stderr  # it had nothing left to stop


def test_the_reaper_of_a_killed_launcher_is_gone_even_if_the_pipe_stays_open(tmp_path):
    """A child forked from the launcher keeps the pipe open: the reaper still notices its parent changing."""
    script = ("import os, sys, time\n"
              "from alp_megatron.rollout import reaper\n"
              "from alp_megatron.rollout.process import ManagedProcess\n"
              "p = ManagedProcess('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'], dict(os.environ),"
              " sys.argv[1])\n"
              "p.start()\n"
              "spare = os.dup(reaper._reaper.stdin.fileno())  # survives the fork, unlike the pipe's own end\n"
              "keeper = os.fork()\n"
              "if keeper == 0:\n"
              "    time.sleep(600)\n"
              "print(reaper.pid(), p.pid, keeper, flush=True)\n"
              "time.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "sleeper.log")], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    reaper_pid, group, keeper = map(int, launcher.stdout.readline().split())
    try:
        launcher.kill()
        launcher.wait()
        assert wait_gone([reaper_pid], 15) == []
        assert not group_running(group)
    finally:
        os.kill(keeper, signal.SIGKILL)


def test_a_message_it_cannot_read_is_skipped(capsys):
    groups = {}
    reaper._apply(b"watch 12 9", groups)  # not JSON
    reaper._apply(b'{"watch": "x"}', groups)
    reaper._apply(b'{"watch": 41, "leader_stop_signal": 9, "shared_memory_prefixes": ["a b,c"]}', groups)
    reaper._apply(b'{"forget": 7}', groups)
    assert groups == {41: (9, ("a b,c",))}
    assert capsys.readouterr().err.count("skipped a message it cannot read") == 2
