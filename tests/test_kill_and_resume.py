"""A run killed with SIGKILL mid-training: no complete event line is lost, a torn last line is skipped,
and ``--resume last`` continues from the newest complete checkpoint with the guard state restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from support import tiny_recipe, write_recipe

from stabguard.events import read_events
from stabguard.runner import run

CLI = "from stabguard.cli import main; main()"


def wait_for(path, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout:.0f} s"
        time.sleep(0.1)


def test_sigkill_loses_no_complete_line_and_resume_restores_the_guards(tmp_path, tiny_assets):
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", plugins=["stabguard.faults"],
                         training={"max_steps": 2000, "save_steps": 3},
                         guards={"faults": {"nan_grad_at": [2]}})  # nonfinite counts one skip before the kill
    path = write_recipe(tmp_path / "recipe.toml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # cwd: not the repository, whose source folder would shadow the installed package under tox
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(path)], env=env, text=True, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(tmp_path / "out" / "checkpoint-6" / "stabguard_state.json", proc)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    log = tmp_path / "out" / "events.jsonl"
    lines = log.read_text().splitlines()
    assert all(json.loads(line) for line in lines), "every line a killed run left is complete JSON"
    with log.open("a") as f:  # what a kill in the middle of a write would leave
        f.write('{"time": 1.0, "run": "torn", "kind": "sk')
    assert len(read_events(log)) == len(lines), "readers skip a torn last line"
    (tmp_path / "out" / "checkpoint-99999").mkdir()  # a checkpoint the kill interrupted: no guard state
    (tmp_path / "out" / "checkpoint-99999" / "trainer_state.json").write_text("{}")

    last = max(int(p.name.removeprefix("checkpoint-")) for p in (tmp_path / "out").glob("checkpoint-*")
               if (p / "stabguard_state.json").exists())
    recipe["training"]["max_steps"] = last + 2
    result = run(write_recipe(tmp_path / "recipe.toml", recipe), resume=True)
    assert result.ok and result.global_step == last + 2
    nonfinite = result.trainer.plugins.guards["nonfinite"].instance
    assert nonfinite.total == 1, "the skip counted before the kill is restored with the checkpoint"
    events = read_events(log)
    assert events[len(lines)]["message"] == "run started", "the torn line stays alone; the resume starts clean"
    resumed = [e for e in events if e.get("run") == result.run_id]
    assert any(f"checkpoint-{last}" in e["message"] for e in resumed if e["kind"] == "info")


def test_a_resumed_run_ends_where_the_run_never_interrupted_ends(tmp_path, tiny_assets):
    """What every framework's resume test compares (support_frameworks.assert_resumed_like), on stabguard
    run: a run that ended after checkpoint-3 and was resumed to step 6 holds, at checkpoint-6, the guard
    counters, plugin states (the spike window), snapshot and recovery state and adapter of one that ran 6
    steps straight. A constant LR: max_steps differs between the two halves."""
    from support_frameworks import assert_resumed_like, guard_state

    def recipe(out, steps):
        training = {"max_steps": steps, "save_steps": 3, "lr_scheduler_type": "constant"}
        return write_recipe(tmp_path / f"{out}.toml", tiny_recipe(
            tiny_assets, tmp_path / out, training=training, plugins=["stabguard.faults"],
            guards={"nonfinite": {}, "spike": {"window": 4}, "faults": {"nan_grad_at": [2, 5]}}))

    assert run(recipe("straight", 6)).ok
    assert run(recipe("halves", 3)).ok
    resumed = run(recipe("halves", 6), resume="last")
    assert resumed.ok and resumed.global_step == 6
    events = [e for e in read_events(tmp_path / "halves" / "events.jsonl") if e["run"] == resumed.run_id]
    assert_resumed_like(tmp_path / "straight" / "checkpoint-6", tmp_path / "halves" / "checkpoint-6", events)
    state = guard_state(tmp_path / "halves" / "checkpoint-6")
    assert state["skipped_steps"] == 2 and state["snapshot_step"] == 5, "a skip on each side of the resume"
    assert len(state["plugins"]["guard:spike"]["losses"]) == 4, "the spike window: steps 1, 3, 4 and 6"
