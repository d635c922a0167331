"""Per-item work on a process pool, results in item order, so the output never depends on scheduling.

Generating or importing a board is independent of every other board, so the boards are shared out
over the cores. Each item's result must depend only on the item (the generators seed each board from
``(seed, index)``), and results come back in item order: the same bytes whatever the number of workers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from stabguard.progress import ProgressFn

MAX_WORKERS = 16  # past this, disk writes and result transfer set the pace, not the CPU


def default_workers() -> int:
    """The cores this process may run on (a container's limit, not the host's count), at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def map_in_order(fn: Callable[[Any], Any], items: Iterable, *, workers: int = 1, what: str = "items",
                 progress: ProgressFn | None = None) -> list:
    """``[fn(item) for item in items]``, on ``workers`` processes when more than one; ``progress(what,
    done, total)`` after each result. ``fn`` must be picklable (a module function or a partial of one)."""
    items = list(items)
    report = progress or (lambda *_: None)
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item))
            report(what, len(results), len(items))
        return results
    return _pooled(fn, items, min(workers, len(items)), what, report)


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group. A worker waiting for work would die printing a traceback;
    # ignoring it, the worker finishes its current item and the parent alone stops, in one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pooled(fn: Callable, items: list, workers: int, what: str, report: ProgressFn) -> list:
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    results = []
    try:
        for result in pool.map(fn, items):
            results.append(result)
            report(what, len(results), len(items))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # not `with`: its exit would finish every queued item
        raise
    pool.shutdown()
    return results
