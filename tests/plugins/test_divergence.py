"""plugins/divergence.py: a loss that stays far above where the run started stops to heal; a spike does not.

The rewind itself is the core's (stabguard/recovery.py, stabguard/step.py); the real run here makes a
divergence that lives in the weights, so only going back further than the last verified state undoes it.
"""

from __future__ import annotations

import torch

from support_faults import Drift

from stabguard.plugins.divergence import DivergenceGuard, Options
from stabguard.trainer import StepState
from stabguard.verdict import Action, Verdict


def feed(guard: DivergenceGuard, losses: list[float], start: int = 1) -> list[Verdict | None]:
    """pre_step then on_step_end for each loss (the step proceeds unless the guard stops it)."""
    said = []
    for step, loss in enumerate(losses, start):
        state = StepState(step=step, grad_norm=torch.tensor(1.0), loss=torch.tensor(loss))
        verdict = guard.pre_step(state=state)
        state.verdict = verdict or Verdict.proceed()
        guard.on_step_end(state=state)
        said.append(verdict)
    return said


def test_a_window_far_above_the_start_stops_healably_and_names_the_numbers():
    guard = DivergenceGuard(Options(window=4, factor=2.0))
    said = feed(guard, [1.0, 1.1, 2.5, 2.6, 2.4, 3.0])
    assert said[:5] == [None] * 5, "the window holds 1.1 until step 6"
    assert said[5].action == Action.STOP and said[5].healable
    assert "every loss of the last 4 steps is above 2.4" in said[5].reason and "reference 1" in said[5].reason


def test_one_high_or_one_low_loss_does_not_make_a_divergence():
    guard = DivergenceGuard(Options(window=4, factor=2.0))
    assert not any(feed(guard, [1.0, 1.0, 9.0, 1.1, 1.0, 0.9, 9.0, 1.2, 1.0]))
    lucky = DivergenceGuard(Options(window=4, factor=2.0))
    assert not any(feed(lucky, [1.0, 0.9, 0.2, 1.0, 1.1, 0.9])), "the best level is a window's lowest, not one batch"


def test_a_rollback_forgets_the_undone_steps_and_the_state_round_trips():
    guard = DivergenceGuard(Options(window=4))
    feed(guard, [1.0, 1.0, 1.0, 2.5, 2.6])
    guard.on_rollback(state=None, restored_step=2)
    assert [s for s, _ in guard.losses] == [2, 3], "it held steps 2-5; step 3's loss came from the restored state"
    again = DivergenceGuard(Options(window=4))
    again.load_state_dict(guard.state_dict())
    assert again.state_dict() == guard.state_dict()


def test_a_divergence_rewinds_to_the_best_earlier_state_with_a_lower_rate_and_the_run_finishes(run_guard):
    drift = Drift()
    run = run_guard(drift, steps=16, builtins=("divergence",), options={"divergence": {"window": 4}},
                    training={"learning_rate": 1e-2, "max_grad_norm": 0.0},
                    snapshots={"ring": 2, "ring_every": 3})
    assert run.ok, run.result.stop_reason
    rewinds = [e for e in run.events_of("remedy") if e["values"]["remedy"] == "rewind"]
    assert rewinds, [e["message"] for e in run.events_of("diagnosis")]
    first = rewinds[0]["values"]
    assert first["restored_step"] < first["from_step"] - 1, "further back than the last verified state"
    assert first["peak_after"] <= first["broke_lr"] / 10 + 1e-12 and first["after"] < first["before"]
    diagnosis = [e for e in run.events_of("diagnosis") if e["step"] == rewinds[0]["step"]][0]
    assert diagnosis["values"]["diagnosis"] == "diverged"
    assert run.losses[max(run.losses)] < 2 * run.losses[min(run.losses)], "it ends near where it started"
