"""tests/support_launch.py: a launch that hangs fails naming what ran, and no process of it outlives the test
(torchrun's workers run in sessions of their own: killing torchrun alone left them running)."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
from support_launch import launch

SPAWNS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(float(sys.argv[2]))
"""


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_hung_launch_fails_naming_it_and_its_session_child_is_killed(tmp_path):
    script, pid = tmp_path / "spawns.py", tmp_path / "pid"
    script.write_text(SPAWNS)
    with pytest.raises(AssertionError, match=r"a sleepy launch: still running after \d+ s \(limit \d+ s"):
        launch([sys.executable, str(script), str(pid), "600"], what="a sleepy launch", limit_s=20)
    assert gone(int(pid.read_text())), "the worker in its own session was killed too"


def test_a_launch_that_ends_leaves_no_orphan_behind(tmp_path):
    script, pid = tmp_path / "spawns.py", tmp_path / "pid"
    script.write_text(SPAWNS)
    done = launch([sys.executable, str(script), str(pid), "0"], what="a quick launch")
    assert done.returncode == 0 and gone(int(pid.read_text()))
