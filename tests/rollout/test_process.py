"""Process-level helpers: port picks, the log scan for a failed start, and launches nothing recorded."""

import json
import os
import signal
import socket
import subprocess
import sys

from alp_megatron.rollout.process import (
    PICK_PORT_RANGE,
    ManagedProcess,
    free_ports,
    pick_port_range,
)


def test_picked_ports_are_distinct_free_and_below_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    low, high = pick_port_range()
    assert low == PICK_PORT_RANGE[0] and high == min(PICK_PORT_RANGE[1], ephemeral_low - 1)
    ports = free_ports(20)
    assert len(set(ports)) == 20 and all(low <= port <= high for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free indeed


def test_a_failure_line_is_found_once_whole_even_when_written_in_pieces(tmp_path):
    """The scan reads only what the current start wrote (the log is appended to across restarts) and waits
    for a line's end before judging it."""
    log = tmp_path / "service.log"
    log.write_text("an earlier start: FATAL port taken\n")
    script = ("import sys, time\n"
              "sys.stdout.write('loading\\nFA'); sys.stdout.flush(); time.sleep(1)\n"
              "sys.stdout.write('TAL port taken\\n'); sys.stdout.flush(); time.sleep(60)\n")
    process = ManagedProcess("writer", [sys.executable, "-c", script], dict(os.environ), str(log),
                             start_failure_lines=("FATAL",))
    process.start()
    try:
        assert process._start_failure_in_log() is None  # the earlier start's line is not this start's
        problem = process.wait_http_ok("http://127.0.0.1:9", "/health", timeout=30)
        assert problem == "failed to start; its log says: FATAL port taken"
        assert process.is_alive()  # found in the log, not by the exit
    finally:
        process.stop()


STRAY_LAUNCH = """
import json, os, subprocess, sys, time
from alp_megatron.rollout.process import ManagedProcess, group_running, stop_unrecorded_launches
sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
recorded = ManagedProcess("recorded", sleeper, dict(os.environ), sys.argv[1])
recorded.start()
stray = subprocess.Popen(sleeper, start_new_session=True)
plain_child = subprocess.Popen(sleeper)  # no session of its own: not a launch
stopped = stop_unrecorded_launches()
deadline = time.monotonic() + 10
while group_running(stray.pid) and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"stopped": stopped, "stray": stray.pid, "stray_code": stray.wait(timeout=10),
                  "recorded_alive": recorded.is_alive(), "plain_alive": plain_child.poll() is None}))
recorded.stop()
plain_child.kill()
"""


def test_a_launch_that_was_never_recorded_is_stopped_and_a_recorded_one_is_not(tmp_path):
    # In a process of its own: here, every session-leading child of the test process would count.
    result = subprocess.run([sys.executable, "-c", STRAY_LAUNCH, str(tmp_path / "recorded.log")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["stopped"] == [outcome["stray"]] and outcome["stray_code"] == -signal.SIGKILL
    assert outcome["recorded_alive"] and outcome["plain_alive"]
