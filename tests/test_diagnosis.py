"""The written diagnosis: ranges, counts and causes, and which findings make a run unhealthy."""

from __future__ import annotations

import math
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from support_runs import hf_log_line, spiky_history, stabguard_history, write_events, write_hf_run

from stabguard.diagnosis import (
    alert_threshold,
    brief,
    clip_value,
    diagnose,
    loss_spikes,
    losses,
    skip_cause,
    step_ranges,
)
from stabguard.trainer_state import load_run


def topics(diagnosis, topic):
    return [f for f in diagnosis.findings if f.topic == topic]


def test_plain_hf_run_with_spike_and_nans(tmp_path):
    spike, nans = (120, 135), (150, 155)
    write_hf_run(tmp_path, spiky_history(spike=spike, nan_steps=nans))
    diagnosis = diagnose(load_run(tmp_path))
    [high] = topics(diagnosis, "grad_norm_high")
    assert f"grad norm > 10 at steps {spike[0]}–{spike[1]}" in high.text
    assert high.severity == "warn", "the spike is over by the last log line"
    [nonfinite] = topics(diagnosis, "nonfinite")
    assert f"steps {nans[0]}–{nans[1]}" in nonfinite.text and "loss logged as 0.0" in nonfinite.text
    assert nonfinite.severity == "trouble", "no guard skipped the NaN updates of a plain Trainer run"
    assert diagnosis.health == "trouble"
    [loss] = topics(diagnosis, "loss")
    assert loss.text.startswith(f"loss smooth after step {nans[-1]}") and "falling" in loss.text


def test_skipped_nans_are_not_trouble_and_name_their_cause(tmp_path):
    nans = (150, 155)
    write_hf_run(tmp_path, stabguard_history(nan_steps=nans))
    write_events(tmp_path, [("nonfinite", "skip", s, f"step {s} skipped: nonfinite: non-finite gradients "
                             f"(loss=2.123456789, grad_norm=nan)", {}) for s in nans])
    diagnosis = diagnose(load_run(tmp_path))
    [skips] = topics(diagnosis, "skip")
    assert skips.text == f"2 steps skipped (non-finite gradients) at steps {nans[0]}, {nans[1]}"
    assert topics(diagnosis, "nonfinite")[0].severity == "warn"
    assert diagnosis.health == "warn"


def test_a_skip_takes_its_cause_from_the_guards_values_not_its_message(tmp_path):
    nans = (150, 155)
    write_hf_run(tmp_path, stabguard_history(nan_steps=nans))
    events = []
    for s in nans:
        events += [("my_guard", "finding", s, "something odd", {"cause": "a bad sample"}),
                   ("my_guard", "skip", s, f"step {s} skipped: my_guard: see the finding (details)", {})]
    write_events(tmp_path, events)
    [skips] = topics(diagnose(load_run(tmp_path)), "skip")
    assert skips.text == f"2 steps skipped (a bad sample) at steps {nans[0]}, {nans[1]}"


def test_healthy_run_is_ok(tmp_path):
    write_hf_run(tmp_path, spiky_history(spike=(0, -1), nan_steps=()))
    diagnosis = diagnose(load_run(tmp_path))
    assert diagnosis.health == "ok", diagnosis.text()
    assert topics(diagnosis, "grad_norm")[0].text.startswith("grad norm below 1 throughout")
    assert "warm-up to" in topics(diagnosis, "lr")[0].text


def test_grad_norm_still_high_at_the_last_log_is_trouble(tmp_path):
    write_hf_run(tmp_path, spiky_history(steps=100, spike=(90, 100), nan_steps=()), max_steps=100)
    diagnosis = diagnose(load_run(tmp_path))
    assert topics(diagnosis, "grad_norm_high")[0].severity == "trouble"
    assert diagnosis.health == "trouble"


def test_stop_event_is_trouble_and_names_the_checkpoint(tmp_path):
    write_hf_run(tmp_path, stabguard_history(steps=50, spike=(0, -1), nan_steps=()), max_steps=100)
    write_events(tmp_path, [("nonfinite", "stop", 51, "run stopped at step 51: 5 consecutive non-finite steps",
                             {"checkpoint": str(tmp_path / "checkpoint-50")})])
    [stop] = topics(diagnose(load_run(tmp_path)), "stop")
    assert stop.severity == "trouble" and stop.text.endswith("last good state in checkpoint-50")


def test_alerts_rollbacks_and_the_alert_line_come_from_events(tmp_path):
    write_hf_run(tmp_path, stabguard_history(spike=(0, -1), nan_steps=()))
    write_events(tmp_path, [("grad_norm", "alert", s, f"grad norm 3.1 above 3 at step {s}", {"threshold": 3.0})
                            for s in (40, 41, 42)] + [("loss_spike", "rollback", 60, "rolled back to step 50", {})])
    run = load_run(tmp_path)
    assert alert_threshold(run) == 3.0
    diagnosis = diagnose(run)
    [alerts] = topics(diagnosis, "alert")
    assert alerts.text.startswith("3 alerts from grad_norm at steps 40–42")
    [rollback] = topics(diagnosis, "rollback")
    assert rollback.text == "1 rollback from loss_spike at step 60; last: rolled back to step 50"
    assert topics(diagnosis, "loss")[0].text.startswith("loss smooth after step 60")


def test_clip_is_seen_where_post_clip_is_below_pre_clip(tmp_path):
    write_hf_run(tmp_path, stabguard_history())  # clipped at 1.0 during the spike
    assert clip_value(load_run(tmp_path)) == 1.0
    write_hf_run(tmp_path, spiky_history())  # a plain Trainer run does not say
    assert clip_value(load_run(tmp_path)) is None


def test_zero_loss_with_finite_grads_asks_about_masking(tmp_path):
    history = [hf_log_line(s, loss=2.0 if s < 4 else 0.0, grad_norm=0.3, lr=1e-4, epoch=s / 6) for s in range(1, 7)]
    write_hf_run(tmp_path, history, max_steps=6)
    run = load_run(tmp_path)
    [zero] = topics(diagnose(run), "loss_zero")
    assert "steps 4–6" in zero.text and "masked" in zero.text
    assert all(math.isfinite(v) for _, v in losses(run)), "0.0 beside a finite grad norm stays 0.0"


def test_event_messages_are_shortened():
    skip = {"guard": "nonfinite", "step": 3, "message": "step 3 skipped: nonfinite: non-finite gradients (loss=7.2)",
            "values": {"reason": "nonfinite: non-finite gradients (loss=7.2, grad_norm=nan)"}}
    assert skip_cause(skip) == "non-finite gradients"
    assert skip_cause({**skip, "values": {}}) == "non-finite gradients", "an event without a reason: its message"
    assert brief("loss=7.116981506347656, grad_norm=nan, lr=0.0001") == "loss=7.117, grad_norm=nan, lr=0.0001"


def test_loss_spikes_against_the_running_median():
    points = [(i, 2.0) for i in range(10)] + [(10, 3.5), (11, 2.0), (12, math.nan), (13, 2.9)]
    assert loss_spikes(points) == [10]


def expand(text: str) -> set[int]:
    """Parse step_ranges' output back (consecutive integers, gap 1)."""
    steps = set()
    for part in re.sub(r"^steps? ", "", text).split(", "):
        low, _, high = part.partition("–")
        steps |= set(range(int(low), int(high or low) + 1))
    return steps


@settings(deadline=None, max_examples=200)
@given(st.sets(st.integers(min_value=0, max_value=60), min_size=1))
def test_step_ranges_cover_exactly_the_steps(steps):
    text = step_ranges(sorted(steps), gap=1, limit=1000)
    assert expand(text) == steps
    assert text.startswith("step ") == (len(steps) == 1)


def test_step_ranges_group_by_logging_interval_and_cap():
    assert step_ranges([120, 130, 140, 300], gap=10) == "steps 120–140, 300"
    assert step_ranges([1, 3, 5, 7, 9, 11], gap=1, limit=4) == "steps 1, 3, 5, 7 and 2 more"


def test_skip_causes_differing_only_in_numbers_are_one_group(tmp_path):
    write_hf_run(tmp_path, stabguard_history(spike=(0, -1), nan_steps=()))
    messages = {41: "step 41 skipped: spike: loss 9.3 is 5.1 sigma above the mean 7.2; rolling back",
                42: "step 42 skipped: spike: loss 9.9 is 6.0 sigma above the mean 7.2; rolling back",
                50: "step 50 skipped: nonfinite: non-finite loss (loss=nan, grad_norm=0.5)"}
    write_events(tmp_path, [(m.split(": ")[1], "skip", s, m, {}) for s, m in messages.items()])
    texts = [f.text for f in topics(diagnose(load_run(tmp_path)), "skip")]
    assert texts == ["2 steps skipped (e.g. loss 9.9 is 6.0 sigma above the mean 7.2) at steps 41–42",
                     "1 step skipped (non-finite loss) at step 50"]


def test_an_adaptive_clip_draws_no_fixed_line(tmp_path):
    history = stabguard_history(nan_steps=())
    for i, line in enumerate(l for l in history if l["grad_norm"] > 1.0):
        line["stabguard/grad_norm_post_clip"] = 0.5 + 0.1 * i  # a threshold that moves
    write_hf_run(tmp_path, history)
    assert clip_value(load_run(tmp_path)) is None
