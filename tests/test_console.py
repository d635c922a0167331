"""stabguard/console.py: which events reach the console, how they read, and how a flood is cut."""

from __future__ import annotations

from stabguard.console import ConsoleEcho, render
from stabguard.events import EventLog


def event(kind, message="", step=3, guard="nonfinite", **values):
    return {"time": 0.0, "step": step, "guard": guard, "kind": kind, "message": message, "values": values}


def echo(**kwargs):
    lines: list[str] = []
    return ConsoleEcho(lines.append, **kwargs), lines


def test_decisions_are_one_line_each_with_step_guard_and_kind():
    line = render(event("skip", "step 3 skipped: nonfinite: non-finite gradients\n(loss=nan)")).plain
    assert line == "step     3 nonfinite skip  step 3 skipped: nonfinite: non-finite gradients (loss=nan)"
    assert "\n" not in render(event("alert", "two\nlines")).plain
    for kind in ("stop", "alert", "rollback", "error", "finding", "drop"):
        assert render(event(kind, "m")) is not None


def test_info_stays_in_the_file_unless_a_guard_asks_for_the_console():
    assert render(event("info", "assistant header ids")) is None
    assert "32-bit state" in render(event("info", "32-bit state", console=True)).plain
    assert render(event("something-new", "m")) is None


def test_a_log_event_is_a_compact_line_of_the_numbers_that_matter():
    logs = {"loss": 7.2341, "grad_norm": 0.38661, "learning_rate": 0.001, "stabguard/skipped_steps": 0,
            "stabguard/optimizer_state_bytes_per_param": 8.0, "epoch": 0.5}
    assert render(event("log", step=2, guard="core", **logs)).plain == "step     2 loss 7.234  grad 0.3866  lr 0.001"
    with_skips = render(event("log", step=4, guard="core", loss=1.0, **{"stabguard/skipped_steps": 2,
                                                                         "stabguard/rollbacks": 1})).plain
    assert with_skips.endswith("skipped 2  rolled back 1")
    peaked = render(event("log", guard="core", grad_norm=0.4, **{"stabguard/grad_norm_max_since_log": 0.9})).plain
    assert peaked.endswith("grad 0.4  max grad 0.9")


def test_a_flood_of_alike_alerts_is_cut_to_a_burst_and_one_more_line():
    show, lines = echo(burst=2)
    for step in range(1, 11):
        show(event("alert", f"grad norm {step * 100} above 10 at step {step}", step=step, guard="grad_norm"))
    show(event("skip", "step 11 skipped", step=11))
    assert len(lines) == 3 and "grad norm 200" in lines[1] and "skip" in lines[2]
    show.flush()
    assert "grad_norm alert  8 more like the above (steps 3-10); all in events.jsonl" in lines[3]
    show.flush()
    assert len(lines) == 4  # said once


def test_held_lines_are_summed_up_while_the_run_goes_on():
    now = [0.0]
    show, lines = echo(burst=1, every_s=30, clock=lambda: now[0])
    for step in range(1, 5):
        now[0] = step * 10.0
        show(event("alert", f"loss {step}.5 spiked", step=step, guard="spike"))
    assert len(lines) == 2 and "2 more like the above (steps 2-3)" in lines[1]


def test_log_lines_are_never_held_back():
    show, lines = echo(burst=1)
    for step in range(5):
        show(event("log", step=step, guard="core", loss=1.0))
    assert len(lines) == 5


def test_the_event_log_echoes_each_event_after_writing_it(tmp_path):
    seen = []
    log = EventLog(tmp_path / "events.jsonl", echo=seen.append)
    log.record("spike", "rollback", "rolled back", step=7, loss=9.0)
    assert seen == log.events and (tmp_path / "events.jsonl").read_text().count("\n") == 1
