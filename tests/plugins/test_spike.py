"""plugins/spike.py: a loss spike asks for a rollback, the window follows the restored state, stop after R.

The snapshot and the restore are the core's (tests/test_step.py); the real-run tests here check both
together, with the faults made from outside the guard.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file
from pydantic import ValidationError
from support_faults import GradFault, LossFault, PoisonBatch, StepProbe, run_guarded, same_state

from stabguard import Verdict
from stabguard.events import read_events
from stabguard.plugins.spike import Options, SpikeGuard
from stabguard.trainer import StepState
from stabguard.verdict import Action, combine

NAN = float("nan")
FAST = {"window": 5, "min_history": 3, "z": 8.0}


def step_state(step: int, loss: float, grad_norm: float = 1.0) -> StepState:
    return StepState(step=step, grad_norm=torch.tensor(grad_norm), loss=torch.tensor(loss))


def one_step(guard, step, loss, others=(), restored_step=None):
    """pre_step, the agreed verdict, on_rollback when the core would restore, on_step_end."""
    state = step_state(step, loss)
    state.verdict = combine([guard.pre_step(state=state), *others])
    if state.verdict.action == Action.ROLLBACK and restored_step is not None:
        guard.on_rollback(state=state, restored_step=restored_step)
    guard.on_step_end(state=state)
    return state.verdict


def warm_up(guard, steps=5):
    for step in range(1, steps + 1):
        assert one_step(guard, step, 1.0 + 0.01 * (step % 3)).action == Action.PROCEED


def test_a_loss_spike_asks_for_a_rollback_with_the_z_score():
    guard = SpikeGuard(Options(**FAST))
    warm_up(guard)
    verdict = one_step(guard, 6, 50.0)
    assert verdict.action == Action.ROLLBACK and verdict.guard == ("spike",)
    assert "sigma above the mean" in verdict.reason and guard.rollbacks == [6]
    assert [s for s, _ in guard.losses] == [1, 2, 3, 4, 5], "a rolled-back step's loss stays out of the window"


def test_after_a_rollback_the_window_is_that_of_the_restored_state():
    """The restored (older) weights are judged by their own history, not by the undone steps' losses."""
    guard = SpikeGuard(Options(window=8, min_history=3, z=4.0))
    for step, loss in enumerate([7.0, 6.9, 6.95, 6.6, 6.5, 6.55, 6.5], start=1):  # learning, then a plateau
        one_step(guard, step, loss)
    assert one_step(guard, 8, 9.0, restored_step=2).action == Action.ROLLBACK
    assert [s for s, _ in guard.losses] == [1, 2, 3], "losses of the undone updates leave the window"
    assert one_step(guard, 9, 6.95).action == Action.PROCEED, "the restored state's own loss is no spike"


def test_another_guards_rollback_is_not_counted_here():
    guard = SpikeGuard(Options(**FAST))
    warm_up(guard)
    one_step(guard, 6, 1.0, others=[Verdict.rollback("loss spike on rank 1", "other")])
    assert guard.rollbacks == []
    one_step(guard, 7, 1.0, others=[Verdict.rollback("loss spike on rank 1", "spike")])
    assert guard.rollbacks == [7], "the agreed verdict counts, whichever rank saw the spike"


def test_stops_after_max_rollbacks_within_the_window():
    guard = SpikeGuard(Options(**FAST, max_rollbacks=2, rollback_window=3))
    warm_up(guard)
    assert [one_step(guard, s, 50.0).action for s in (6, 7)] == [Action.ROLLBACK, Action.ROLLBACK]
    verdict = one_step(guard, 8, 50.0)
    assert verdict.action == Action.STOP and "after 2 rollbacks within 3 steps" in verdict.reason
    assert one_step(guard, 10, 50.0).action == Action.ROLLBACK  # step 7's rollback has left the window


def test_a_nonfinite_streak_asks_for_a_rollback():
    guard = SpikeGuard(Options(nonfinite_streak=2))
    one_step(guard, 1, 1.0)
    assert one_step(guard, 2, NAN).action == Action.PROCEED
    verdict = one_step(guard, 3, NAN)
    assert verdict.action == Action.ROLLBACK and "2 non-finite steps in a row" in verdict.reason


def test_options_are_validated_by_name():
    with pytest.raises(ValidationError) as err:
        Options(window=10, min_history=20, z=0, colour="red")
    errors = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert set(errors) == {"min_history", "z", "colour"}
    assert "min_history (20) must not exceed window (10)" in errors["min_history"]


def test_state_round_trips_through_json():
    guard = SpikeGuard(Options(**FAST))
    warm_up(guard)
    one_step(guard, 6, 50.0)
    restored = SpikeGuard(Options(**FAST))
    restored.load_state_dict(state=json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict() and restored.rollbacks == [6]


# -- real faults in a real tiny run ----------------------------------------------------------------

def test_loss_spike_in_a_real_run_rolls_back_and_names_the_skipped_samples(tmp_path, tiny_assets):
    batches, probe = PoisonBatch(at=()), StepProbe(keep=range(1, 9))  # PoisonBatch only records the ids
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={6}, scale=50.0), batches, probe,
                            training={"max_steps": 8}, guards={"spike": FAST})
    assert result.ok and (result.skipped_steps, result.rollbacks) == (0, 1) and probe.steps("ROLLBACK") == [6]
    # The weights after step 5 produced the spike: the last verified state is the one after step 4.
    assert same_state(probe.after[6], probe.after[4]), "step 6 must end with the state after step 4"
    assert not same_state(probe.after[6], probe.before[6])
    assert probe.lrs[7] == probe.lrs[6], "a rollback holds the LR scheduler like a skip"
    events = read_events(result.output_dir / "events.jsonl")
    (rollback,) = [e for e in events if e["kind"] == "rollback"]
    assert rollback["step"] == 6 and rollback["guard"] == "spike" and rollback["values"]["restored_step"] == 4
    assert rollback["values"]["skipped_samples"] == batches.ids[5]
    assert rollback["values"]["undone_samples"] == {"5": batches.ids[4]}


def test_repeated_spikes_stop_the_run_with_the_last_verified_state(tmp_path, tiny_assets):
    probe = StepProbe(keep={3})  # recovery off: this is the guard's own STOP (tests/test_recovery.py heals it)
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6, 7}, scale=50.0), probe,
                            training={"max_steps": 10}, guards={"spike": {**FAST, "max_rollbacks": 2}},
                            recovery={"enabled": False})
    assert result.stop_reason.startswith("step 7: spike: loss") and "after 2 rollbacks" in result.stop_reason
    checkpoint = result.output_dir / "checkpoint-6"
    saved = json.loads((checkpoint / "stabguard_state.json").read_text())
    assert saved["verified_step"] == 3, "the state after step 3: step 4's loss was the last one judged good"
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    after3 = {n.replace(".default", ""): t for n, t in probe.after[3][0].items()}
    assert adapter and all(torch.equal(t, after3[f"base_model.model.{n}" if f"base_model.model.{n}" in after3
                                                 else n]) for n, t in adapter.items())
    events = read_events(result.output_dir / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "rollback"] == [5, 6]
    (stop,) = [e for e in events if e["kind"] == "stop"]
    assert stop["values"]["verified"] is True and stop["values"]["restored_step"] == 3


def test_nonfinite_streak_rolls_back_before_nonfinite_stops(tmp_path, tiny_assets):
    probe = StepProbe(keep={1, 4})
    result, _ = run_guarded(tmp_path, tiny_assets, GradFault(at={3, 4}, value=NAN), probe,
                            training={"max_steps": 6}, guards={"nonfinite": {"max_consecutive": 3},
                                                               "spike": {**FAST, "nonfinite_streak": 2}})
    assert result.ok and probe.steps("SKIP") == [3] and probe.steps("ROLLBACK") == [4]
    # Step 3's gradient was NaN, so the weights after step 2 were never judged good: back to after step 1.
    assert same_state(probe.after[4], probe.after[1])
    (rollback,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "rollback"]
    assert rollback["step"] == 4 and "2 non-finite steps in a row" in rollback["message"]


DAMAGE_AT = 20


def damaged_run(tmp_path, tiny_assets, *, spike: bool, snapshots: int):
    """28 steps at the demo's learning rate; noise on every adapter right after step 20's update."""
    from stabguard.faults import FaultInjector, Options as FaultOptions

    fault, probe = FaultInjector(FaultOptions(damage_at=[DAMAGE_AT], damage_std=0.5)), StepProbe()
    enabled = ("nonfinite", "grad_norm", "spike") if spike else ("nonfinite", "grad_norm")
    result, _ = run_guarded(tmp_path, tiny_assets, fault, probe, enabled=enabled,
                            training={"max_steps": 28, "learning_rate": 3e-3},
                            guards={"spike": {"window": 8, "min_history": 5, "z": 6.0}} if spike else None,
                            snapshots={"every": snapshots})
    before = statistics.fmean(probe.losses[s] for s in range(DAMAGE_AT - 3, DAMAGE_AT + 1))
    after = statistics.fmean(probe.losses[s] for s in range(DAMAGE_AT + 2, DAMAGE_AT + 6))
    return result, before, after


@pytest.mark.parametrize("snapshots, restored", [(1, DAMAGE_AT - 1), (5, 15)])
def test_a_finite_damaging_update_is_undone(tmp_path, tiny_assets, snapshots, restored):
    """Every step (the default) and every 5 steps, with the damage on a step a snapshot would follow."""
    result, before, after = damaged_run(tmp_path, tiny_assets, spike=True, snapshots=snapshots)
    assert result.ok and (result.skipped_steps, result.rollbacks) == (0, 1)
    (rollback,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "rollback"]
    assert rollback["step"] == DAMAGE_AT + 1 and rollback["values"]["restored_step"] == restored
    assert rollback["values"]["skipped_samples"], "the rollback names the samples it skipped"
    assert after < before + 0.08, f"loss back to its pre-damage level ({before:.3f}), got {after:.3f}"
    # on_rollback rewound the loss window: the losses of the undone updates' steps left it (with a snapshot
    # every 5 steps the rollback went back 6 steps; with one every step there is nothing to drop).
    undone = set(range(restored + 2, DAMAGE_AT + 1))
    window = {step for step, _ in result.trainer.plugins.guards["spike"].instance.losses}
    assert not undone & window, f"undone steps {sorted(undone & window)} still judge the restored weights"
    assert restored + 1 in window, "the restored weights' own loss stays"
    assert snapshots == 1 or len(undone) == 4


def test_without_the_spike_guard_the_same_damage_stays(tmp_path, tiny_assets):
    """The control: the fault above is really damaging."""
    result, before, after = damaged_run(tmp_path, tiny_assets, spike=False, snapshots=1)
    assert result.ok and after > before + 0.2
