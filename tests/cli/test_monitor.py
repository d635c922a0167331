"""``stabguard monitor``: the --once snapshot (text and exit code) and the live view, on HF and real runs."""

from __future__ import annotations

import io
import math
import os
import shutil
import threading

import pytest
from click.testing import CliRunner
from support_runs import PoisonSteps, run_tiny, spiky_history, write_hf_run

from stabguard.cli.monitor import EXIT_NO_STATE, EXIT_OK, EXIT_UNHEALTHY, command, sparkline, watch
from stabguard.diagnosis import num
from stabguard.events import read_events
from stabguard.trainer_state import TrainerStateReader


def once(folder):
    return CliRunner().invoke(command, [str(folder), "--once"])


def rows(output: str) -> dict[str, str]:
    """The snapshot's rows by label (continuation lines, with an empty label, are left out)."""
    found = {}
    for line in output.splitlines()[1:]:
        if line and not line.startswith(" "):
            label, _, text = line.partition("  ")
            found.setdefault(label, text.strip())
    return found


def test_plain_hf_run_with_nans_is_unhealthy(tmp_path):
    history = spiky_history()
    write_hf_run(tmp_path, history)
    result = once(tmp_path)
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    assert "\x1b[" not in result.output, "--once prints plain text for scripts"
    assert result.output.startswith(f"stabguard monitor: {tmp_path} (trainer_state.json")
    row, last = rows(result.output), history[-1]
    assert row["status"] == "TROUBLE"
    assert row["step"] == f"{last['step']} / {last['step']} (100%)" and row["time"] == "finished in 2m 03s"
    assert row["loss"].startswith(num(last["loss"]))
    assert row["grad norm"].startswith(f"pre-clip {num(last['grad_norm'])}, no clip (step {last['step']}; "
                                       "fine < 1, trouble > 10)")
    assert row["lr"].startswith(f"{last['learning_rate']:.2e} (decaying")
    assert row["dropped"] == "none dropped" and row["alerts"] == "none"
    assert "non-finite grad norm at steps 150–155" in row["diagnosis"]


def test_healthy_run_exits_zero(tmp_path):
    write_hf_run(tmp_path, spiky_history(spike=(0, -1), nan_steps=()))
    result = once(tmp_path)
    assert result.exit_code == EXIT_OK and rows(result.output)["status"] == "OK"


def test_nothing_to_read_exits_two_naming_the_folder(tmp_path):
    result = once(tmp_path)
    assert result.exit_code == EXIT_NO_STATE
    assert f"{tmp_path}: no trainer_state.json" in result.stderr


def test_a_live_run_is_read_from_its_newest_checkpoint_with_an_eta(tmp_path):
    history = spiky_history(steps=400, spike=(0, -1), nan_steps=())
    for step, mtime in ((100, 1_000), (200, 1_100)):
        write_hf_run(tmp_path, history[: step // 5], max_steps=400, checkpoint=step, finished=False)
        os.utime(tmp_path / f"checkpoint-{step}" / "trainer_state.json", (mtime, mtime))
    result = once(tmp_path)
    assert result.output.startswith(f"stabguard monitor: {tmp_path} (checkpoint-200/trainer_state.json")
    row = rows(result.output)
    assert row["step"] == "200 / 400 (50%)"
    assert row["time"] == "3m 20s left (1.00 s/step)"  # 200 steps left at 100 s per 100 steps


def test_live_view_waits_for_the_run_and_ends_when_it_is_finished(tmp_path):
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    writer = threading.Timer(0.4, write_hf_run, args=(tmp_path, spiky_history(spike=(0, -1), nan_steps=())))
    writer.start()
    try:
        code = watch(TrainerStateReader(tmp_path, retries=0), interval=0.1, console=console)
    finally:
        writer.join()
    assert code == EXIT_OK
    frames = screen.getvalue()
    assert "waiting:" in frames and "no trainer_state.json" in frames
    assert frames.index("waiting:") < frames.index("finished in 2m 03s")
    assert "grad norm below 1 throughout" in frames


def test_started_before_the_run_it_waits_for_the_folder(tmp_path):
    out = tmp_path / "runs" / "x"
    maker = threading.Timer(0.3, lambda: write_hf_run(out, spiky_history(spike=(0, -1), nan_steps=())))
    maker.start()
    try:
        result = CliRunner().invoke(command, [str(out), "--interval", "0.1"])
    finally:
        maker.join()
    assert result.exit_code == EXIT_OK and f"waiting for {out}" in result.stderr
    assert "finished in 2m 03s" in result.output


def test_a_folder_that_never_appears_ends_the_wait_naming_it(tmp_path):
    result = CliRunner().invoke(command, [str(tmp_path / "nope"), "--wait", "0.2", "--interval", "0.1"])
    assert result.exit_code == EXIT_NO_STATE and f"{tmp_path / 'nope'} does not exist" in result.stderr
    once_result = CliRunner().invoke(command, [str(tmp_path / "nope"), "--once"])
    assert once_result.exit_code == EXIT_NO_STATE and "waiting" not in once_result.stderr


def test_live_view_off_a_terminal_prints_the_last_frame(tmp_path):
    write_hf_run(tmp_path, spiky_history())
    result = CliRunner().invoke(command, [str(tmp_path), "--interval", "0.1"])
    assert result.exit_code == EXIT_UNHEALTHY and "non-finite grad norm" in result.output


def test_sparkline_marks_non_finite_values():
    assert sparkline([1.0, 2.0, 3.0, math.nan]) == "▁▅█!"
    assert sparkline([2.0, 2.0]) == "▁▁" and sparkline([math.inf]) == "!"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_assets):
    """A real tiny run: a NaN gradient skipped at step 2, a second one in a row stops it at step 3."""
    tmp = tmp_path_factory.mktemp("stopped")
    result = run_tiny(tmp, tiny_assets, PoisonSteps(2, 3), training={"max_steps": 4, "save_steps": 2},
                      guards={"nonfinite": {"max_consecutive": 2}})
    assert not result.ok
    return result.output_dir


def test_real_stopped_run_is_unhealthy(stopped_run):
    result = once(stopped_run)
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    events = read_events(stopped_run / "events.jsonl")
    skips = [e["step"] for e in events if e["kind"] == "skip"]
    row = rows(result.output)
    assert row["status"] == "TROUBLE" and row["time"] == "run stopped"
    assert row["dropped"] == f"{len(skips)} dropped: {len(skips)} skipped (last at step {skips[-1]})"
    assert row["alerts"].endswith("1 stop") and row["grad norm"].startswith("pre-clip nan, clip 1 ")
    assert row["diagnosis"].startswith("[trouble] run stopped at step 3") and "checkpoint-2" in result.output


def test_after_a_resume_the_monitor_follows_the_new_run(tmp_path, stopped_run, tiny_assets):
    """A STOP, then --resume: the stop belongs to the earlier run; --run all and --run ID still show it."""
    shutil.copytree(stopped_run, tmp_path / "out")
    resumed = run_tiny(tmp_path, tiny_assets, training={"max_steps": 4, "save_steps": 2},
                       resume=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.ok
    result = once(tmp_path / "out")
    assert result.exit_code == EXIT_OK, result.output
    assert f"run {resumed.run_id} of 2 (--run ID|all)" in result.output.splitlines()[0]
    row = rows(result.output)
    assert row["status"] != "TROUBLE" and "stop" not in row.get("alerts", "")
    first = read_events(tmp_path / "out" / "events.jsonl")[0]["run"]
    for choice in ("all", first):
        earlier = CliRunner().invoke(command, [str(tmp_path / "out"), "--once", "--run", choice])
        assert earlier.exit_code == EXIT_UNHEALTHY and rows(earlier.output)["status"] == "TROUBLE"
    unknown = CliRunner().invoke(command, [str(tmp_path / "out"), "--once", "--run", "nosuch"])
    assert unknown.exit_code == EXIT_NO_STATE and "run 'nosuch' not found; runs in this log:" in unknown.output


def test_the_last_step_that_said_where_it_broke_is_a_row(tmp_path):
    from support_runs import write_events

    from stabguard.cli.monitor import event_rows
    from stabguard.trainer_state import load_run

    write_hf_run(tmp_path, spiky_history())
    where = {"modules": [["language_model.layers.2.mlp.up_proj", "lora_B", 0.97]], "nonfinite": {}, "layers": {}}
    write_events(tmp_path, [("grad_norm", "alert", 40, "grad norm high", {"where": where})])
    (row,) = [r for r in event_rows(load_run(tmp_path)) if r.label == "where"]
    assert (row.text, row.severity) == ("step 40: language_model.layers.2.mlp.up_proj (lora_B) 97%", "warn")


def test_remedies_are_a_row_with_the_quarantined_count_and_the_budget_left(tmp_path):
    from support_runs import write_events

    from stabguard.cli.monitor import event_rows
    from stabguard.trainer_state import load_run

    write_hf_run(tmp_path, spiky_history())
    write_events(tmp_path, [
        ("core", "remedy", 19, "quarantine", {"remedy": "quarantine", "samples": ["t.jsonl:5"], "budget_left": 2}),
        ("core", "remedy", 40, "cool down", {"remedy": "cool_down", "before": 1e-3, "after": 5e-4, "budget_left": 1}),
        ("core", "remedy", 90, "cool-down ended", {"remedy": "cool_down_end"})])
    (row,) = [r for r in event_rows(load_run(tmp_path)) if r.label == "healed"]
    assert row.text == "2 remedies, 1 sample(s) quarantined; last at step 40: cool_down (1 left in the budget)"
