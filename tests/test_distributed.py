"""DDP on two CPU ranks (gloo, torchrun): a hook that raises on one rank stops both with the same reason;
a rank killed mid-run under ``torchrun --max-restarts`` restarts the job, which resumes (``--resume auto``).

The run is tests/engine_worker.py (its docstring lists the scenarios); the fault scenario every engine
shares is in tests/test_engines.py. About 20 s per launch on 2 cores.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from support_launch import engine_run

from stabguard.events import read_events

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)]


@pytest.mark.parametrize("hook, rank", [("post_collate", 1), ("pre_step", 0)])
def test_a_hook_raising_on_one_rank_stops_both_with_the_same_reason(tmp_path, tiny_assets, hook, rank):
    rank0, rank1 = engine_run(tmp_path, "ddp", hook, tiny_assets)  # returns: neither rank hung
    for report in (rank0, rank1):
        assert not report["ok"] and report["error"] == "crash"
        assert report["stop_reason"] == rank0["stop_reason"]
        assert f"hook {hook} of plugin 'fault-0', rank {rank}" in report["stop_reason"]
        assert "ValueError: a bug on rank" in report["stop_reason"]
    assert rank0["run"] == rank1["run"], "one run id on every rank"
    if hook == "post_collate":
        assert "samples: " in rank0["stop_reason"], "a data hook's failure names the samples"
    events = read_events(tmp_path / "run" / "events.jsonl")
    (error,) = [e for e in events if e["kind"] == "error"]
    assert error["rank"] == rank and error["values"]["hook"] == hook, "the failing rank's own line"
    (stop,) = [e for e in events if e["kind"] == "stop"]
    assert stop["rank"] == 0 and stop["values"]["checkpoint"], "a step ran: the last good state is saved"
    assert (Path(stop["values"]["checkpoint"]) / "stabguard_state.json").exists()


KILLER = '''
import os
import signal

from stabguard import hookimpl


@hookimpl
def on_step_end(state):
    """Rank 1 dies (SIGKILL) at step 5 of the job's first attempt; torchrun restarts the whole job."""
    if state.step == 5 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_rank_killed_mid_run_restarts_the_job_which_resumes_and_finishes(tmp_path, tiny_assets):
    from support import tiny_recipe, write_recipe
    from support_launch import launch

    (tmp_path / "killer.py").write_text(KILLER)
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", plugins=["killer"],
                         training={"max_steps": 8, "save_steps": 2, "ddp_find_unused_parameters": False})
    path = write_recipe(tmp_path / "recipe.toml", recipe)
    (tmp_path / "cli.py").write_text("from stabguard.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(tmp_path / "cli.py"), "run", str(path), "--resume", "auto"]
    done = launch(cmd, what="torchrun --max-restarts 1 ... stabguard run --resume auto", cwd=tmp_path)
    assert "starting fresh" in done.stdout and "resuming from" in done.stdout
    events = read_events(tmp_path / "out" / "events.jsonl")
    runs = list(dict.fromkeys(e["run"] for e in events))
    assert len(runs) == 2, "the killed attempt and the restarted one, told apart by run id"
    first = [e for e in events if e["run"] == runs[0]]
    second = [e for e in events if e["run"] == runs[1]]
    assert max(e["step"] or 0 for e in first if e["kind"] == "log") >= 4, "the first attempt's lines are kept"
    (start,) = [e for e in second if e["values"].get("start_step") is not None and e["rank"] == 0]
    assert start["values"]["start_step"] == 4, "the restart resumed from the newest complete checkpoint"
    assert any(e["kind"] == "log" and e["step"] == 8 for e in second) and (tmp_path / "out" / "checkpoint-8").is_dir()


def test_check_probe_under_torchrun_runs_on_every_rank_and_prints_once(tmp_path, tiny_assets):
    """``torchrun ... stabguard check RECIPE --probe`` as a user types it (DDP, 2 ranks): one report, by rank 0."""
    from support import tiny_recipe, write_recipe
    from support_launch import launch

    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"ddp_find_unused_parameters": False})
    path = write_recipe(tmp_path / "recipe.toml", recipe)
    (tmp_path / "cli.py").write_text("from stabguard.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "cli.py"), "check", str(path), "--probe"]
    done = launch(cmd, what="torchrun --nproc-per-node 2 ... stabguard check --probe", cwd=tmp_path)
    assert done.stdout.count(f"stabguard check {path}") == 1, "rank 0 alone prints the report"
    step = r"probe: step: forward \+ backward of 2 batch\(es\) of \d sample\(s\) on each of 2 ranks"
    assert re.search(step, done.stdout), "each rank ran its 2 micro-batches"
    assert "probe: gradients: all 28 trainable tensors got a finite gradient" in done.stdout
    assert "ready to run" in done.stdout and not (tmp_path / "out").exists()
