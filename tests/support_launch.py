"""Subprocesses of the tests (torchrun with its workers, the CLI): bounded in time, and nothing outlives them.

A launch that does not end within its limit is a hang or a machine far too loaded; it is killed with
every process it started, and the failure says what was running and how it ended. torchrun starts each
worker in a session of its own, so killing torchrun alone would leave the workers running (about 1 GB
each): every process of a launch carries a marker in its environment and is found by it.

The limit is generous (load alone makes a 10-30 s launch a few times slower, not 20 times) and scales
with ``STABGUARD_TEST_TIMEOUT_SCALE`` (e.g. 2 on a machine known to be slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

HANG_LIMIT_S = 600.0
MARKER = "STABGUARD_TEST_LAUNCH"


def hang_limit(seconds: float = HANG_LIMIT_S) -> float:
    return seconds * float(os.environ.get("STABGUARD_TEST_TIMEOUT_SCALE", "1"))


def launch_env(**extra: str) -> dict[str, str]:
    """One thread per process (two processes on two cores oversubscribe otherwise), no plugins, no hub."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1",
            **extra}


def launch(cmd: list[str], *, what: str, cwd: Path | None = None, limit_s: float | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (output captured, stderr into stdout); fail naming ``what`` if it hangs.

    With ``check``, a non-zero exit fails with the end of the output. Every process the command started
    is gone when this returns.
    """
    limit = hang_limit(limit_s or HANG_LIMIT_S)
    marker = uuid.uuid4().hex
    started = time.monotonic()
    # Output to a file, not a pipe: a worker that outlives the command would hold a pipe open.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=launch_env(**{MARKER: marker}), cwd=cwd, text=True, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_marked(marker)
            proc.wait()
            raise AssertionError(f"{what}: still running after {time.monotonic() - started:.0f} s (limit {limit:.0f} s:"
                                 f" a hang, or a machine far too loaded; STABGUARD_TEST_TIMEOUT_SCALE=2 doubles it); "
                                 f"killed with its workers. Command: {' '.join(cmd)}\n"
                                 f"Last output:\n{_tail(log)}") from None
        finally:
            kill_marked(marker)
        out = _tail(log, 100_000)
    if check:
        took = time.monotonic() - started
        assert proc.returncode == 0, f"{what} exited {proc.returncode} after {took:.0f} s:\n{out[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _tail(log, size: int = 4000) -> str:
    log.seek(0)
    return log.read()[-size:]


def torchrun(script: Path | str, *args, what: str, nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N script args...`` through :func:`launch`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *map(str, args)]
    return launch(cmd, what=what, **kwargs)


def marked(marker: str) -> list[psutil.Process]:
    """The processes whose environment carries this launch's marker (workers in sessions of their own too)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_marked(marker: str) -> None:
    procs = marked(marker)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


ENGINE_WORKER = Path(__file__).with_name("engine_worker.py")


def engine_run(out: Path, engine: str, scenario: str, assets=None, nproc: int = 2) -> list[dict]:
    """tests/engine_worker.py under torchrun: ENGINE (ddp, fsdp2, zero1/2/3 and options) runs SCENARIO on
    ``nproc`` CPU ranks; returns each rank's report."""
    model, train = (assets["model"], assets["train"]) if assets else ("-", "-")
    torchrun(ENGINE_WORKER, engine, model, train, out, scenario, nproc=nproc, cwd=out,
             what=f"{engine} '{scenario}' on {nproc} rank(s) (tests/engine_worker.py)")
    return [json.loads((out / f"rank{r}_{scenario}.json").read_text()) for r in range(nproc)]
