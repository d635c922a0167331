"""map_in_order: the same results in the same order on one process or several; progress per result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from stabguard.data.workers import MAX_WORKERS, default_workers, map_in_order


def square(x: int) -> int:
    return x * x


def stop_at_three(x: int) -> int:
    if x == 3:
        raise KeyboardInterrupt
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_item_order_and_progress_after_each(workers):
    seen = []
    results = map_in_order(square, range(7), workers=workers, what="squares", progress=lambda *a: seen.append(a))
    assert results == [x * x for x in range(7)]
    assert seen == [("squares", done, 7) for done in range(1, 8)]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupt_in_any_worker_reaches_the_caller(workers):
    with pytest.raises(KeyboardInterrupt):
        map_in_order(stop_at_three, range(40), workers=workers)


def test_default_workers_is_the_available_cores_capped():
    assert 1 <= default_workers() <= MAX_WORKERS


SCRIPT = """
import sys, time
from stabguard.data.workers import map_in_order

def nap(seconds):
    time.sleep(seconds)
    return seconds

try:
    map_in_order(nap, [0, 1.5], workers=2, progress=lambda what, done, total: print(done, flush=True))
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_leaves_an_idle_worker_quiet(tmp_path):
    # Ctrl-C reaches the whole process group; a worker waiting for work must not print a traceback
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline() == "1\n"  # the first item is done: one worker now waits for work
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == ""
