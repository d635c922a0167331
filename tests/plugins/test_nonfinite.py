"""plugins/nonfinite.py: a NaN/Inf loss or gradient skips the step, N in a row stop the run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from support_faults import GradFault, LossFault, PoisonBatch, StepProbe, run_guarded, same_state

from stabguard import EventLog, Verdict
from stabguard.events import read_events
from stabguard.plugins.nonfinite import NonFiniteGuard, Options
from stabguard.trainer import StepState
from stabguard.verdict import Action, combine

NAN, INF = float("nan"), float("inf")


def step_state(step: int, loss: float, grad_norm: float) -> StepState:
    return StepState(step=step, grad_norm=torch.tensor(grad_norm), loss=torch.tensor(loss))


def one_step(guard: NonFiniteGuard, events: EventLog, step: int, loss: float, grad_norm: float,
             others: list[Verdict | None] = ()) -> Verdict:
    """pre_step, then the verdict the core would agree on (with other guards' or ranks'), then on_step_end."""
    state = step_state(step, loss, grad_norm)
    state.verdict = combine([guard.pre_step(state=state, events=events), *others])
    guard.on_step_end(state=state)
    return state.verdict


@pytest.mark.parametrize("loss, grad_norm, cause", [
    (NAN, 1.0, "loss"), (INF, 1.0, "loss"), (1.0, NAN, "gradients"), (1.0, -INF, "gradients"),
    (NAN, INF, "loss and gradients"),
])
def test_nonfinite_step_is_skipped_naming_the_cause(loss, grad_norm, cause):
    events = EventLog()
    verdict = NonFiniteGuard(Options()).pre_step(state=step_state(7, loss, grad_norm), events=events)
    assert verdict.action == Action.SKIP and verdict.guard == ("nonfinite",)
    assert f"non-finite {cause} (" in verdict.reason
    (finding,) = events.of_kind("finding")
    assert finding["step"] == 7 and finding["values"]["nonfinite"] == cause
    assert finding["values"]["cause"] == f"non-finite {cause}"


def test_finite_step_proceeds_and_records_nothing():
    events = EventLog()
    assert NonFiniteGuard(Options()).pre_step(state=step_state(1, 2.5, 0.3), events=events) is None
    assert events.events == []


@settings(deadline=None, max_examples=60)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(1, 5))
def test_stops_exactly_at_max_consecutive_nonfinite_steps(bad_steps, limit):
    guard, events = NonFiniteGuard(Options(max_consecutive=limit)), EventLog()
    run = 0
    for step, bad in enumerate(bad_steps, start=1):
        verdict = one_step(guard, events, step, NAN if bad else 1.0, 1.0)
        run = run + 1 if bad else 0
        expected = Action.PROCEED if not bad else Action.STOP if run >= limit else Action.SKIP
        assert verdict.action == expected, (step, bad_steps)
        if expected == Action.STOP:
            assert f"{limit} consecutive non-finite steps" in verdict.reason
            break
    assert guard.total == sum(bad_steps[:step])


def test_counters_follow_the_agreed_verdict():
    """Another rank's NaN (agreed SKIP naming nonfinite) counts here too; another guard's SKIP does not."""
    guard, events = NonFiniteGuard(Options(max_consecutive=3)), EventLog()
    one_step(guard, events, 1, 1.0, 1.0, others=[Verdict.skip("NaN loss on rank 1", "nonfinite")])
    one_step(guard, events, 2, NAN, 1.0)
    assert (guard.consecutive, guard.total) == (2, 2)
    assert one_step(guard, events, 3, NAN, 1.0).action == Action.STOP
    guard.consecutive = 1
    one_step(guard, events, 4, 1.0, 1.0, others=[Verdict.skip("loss spike", "spike")])
    assert guard.consecutive == 0


def test_fp16_overflows_skip_without_counting_towards_the_stop():
    guard, events = NonFiniteGuard(Options(max_consecutive=2)), EventLog()
    for step in range(1, 6):  # the GradScaler calibrating: inf gradients under a finite loss
        state = StepState(step=step, grad_norm=torch.tensor(INF), loss=torch.tensor(2.0), loss_scaled=True)
        state.verdict = combine([guard.pre_step(state=state, events=events)])
        guard.on_step_end(state=state)
        assert state.verdict.action == Action.SKIP and "overflow" in state.verdict.reason
    assert guard.overflows == 5 and guard.consecutive == 0 and len(events.of_kind("overflow")) == 5
    # a NaN loss under the scaler is no overflow: it counts, and stops at the limit
    verdicts = [one_step(guard, events, step, NAN, INF) for step in (6, 7)]
    assert [v.action for v in verdicts] == [Action.SKIP, Action.STOP]


def test_state_round_trips_through_json():
    guard = NonFiniteGuard(Options())
    guard.consecutive, guard.total = 2, 9
    restored = NonFiniteGuard(Options())
    restored.load_state_dict(state=json.loads(json.dumps(guard.state_dict())))
    assert (restored.consecutive, restored.total) == (2, 9)


def test_options_reject_a_bad_limit_by_name():
    with pytest.raises(ValidationError) as err:
        Options(max_consecutive=0)
    assert err.value.errors()[0]["loc"] == ("max_consecutive",)


# -- real faults in a real tiny run ----------------------------------------------------------------

@pytest.mark.parametrize("fault, cause", [
    (GradFault(at={2}, value=NAN), "gradients"),  # one NaN in one LoRA gradient
    (LossFault(at={2}, scale=INF), "loss and gradients"),  # an Inf loss, and the gradients it makes
], ids=["nan-lora-grad", "inf-loss"])
def test_faulty_step_changes_nothing_and_holds_the_lr(tmp_path, tiny_assets, fault, cause):
    probe = StepProbe(keep={2})
    result, _ = run_guarded(tmp_path, tiny_assets, fault, probe, training={"max_steps": 4})
    assert result.ok and result.skipped_steps == 1 and probe.steps("SKIP") == [2]
    assert same_state(probe.before[2], probe.after[2]), "a skipped step must leave weights and optimizer as they were"
    assert probe.lrs[3] == probe.lrs[2] > probe.lrs[4], "the scheduler must hold on the skipped step only"
    assert all(torch.isfinite(p).all() for p in result.trainer.model.parameters())
    events = read_events(result.output_dir / "events.jsonl")
    (finding,) = [e for e in events if e["kind"] == "finding" and "hardware" not in e["values"]]
    assert finding["step"] == 2 and finding["values"]["cause"] == f"non-finite {cause}"
    assert [e["step"] for e in events if e["kind"] == "skip" and e["guard"] == "nonfinite"] == [2]
    logged = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    lines = [e for e in logged if "grad_norm" in e]
    assert [e["stabguard/skipped_steps"] for e in lines] == [0, 1, 1, 1]
    assert [("loss" in e) for e in lines] == [True, False, True, True], "the skipped step's window logs no loss"
    assert all(math.isfinite(e["loss"]) for e in lines if "loss" in e), "a dropped NaN/Inf must not poison later lines"


def test_consecutive_poisoned_batches_stop_with_a_checkpoint(tmp_path, tiny_assets):
    poison = PoisonBatch(at={3, 4})  # NaN pixels: NaN loss and gradients
    result, _ = run_guarded(tmp_path, tiny_assets, poison, training={"max_steps": 8},
                            guards={"nonfinite": {"max_consecutive": 2}}, enabled=("nonfinite",))
    assert result.stop_reason.startswith("step 4: nonfinite: 2 consecutive non-finite steps")
    checkpoint = result.output_dir / "checkpoint-3"
    saved = json.loads((checkpoint / "stabguard_state.json").read_text())
    # The last verified state: step 2's loss judged the weights after step 1 (step 3's NaN leaves the
    # weights after step 2 unjudged); the guard state is the one of that moment.
    assert saved["verified_step"] == 1 and saved["plugins"]["guard:nonfinite"] == {"consecutive": 0, "total": 0}
    assert not (result.output_dir / "checkpoint-4").exists()
    stops = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "stop"]
    assert [e["step"] for e in stops] == [4] and stops[0]["values"]["checkpoint"].endswith("checkpoint-3")


def test_resume_restores_every_gradient_guards_state(tmp_path, tiny_assets):
    first, plugins = run_guarded(tmp_path, tiny_assets, GradFault(at={2}, value=NAN),
                                 training={"max_steps": 3, "save_steps": 3})
    saved = {name: spec.instance.state_dict() for name, spec in plugins.guards.items()}
    assert saved["nonfinite"]["total"] == 1 and len(saved["spike"]["losses"]) == 2
    resumed, plugins = run_guarded(tmp_path, tiny_assets, training={"max_steps": 5, "save_steps": 3},
                                   resume=str(first.output_dir / "checkpoint-3"))
    assert resumed.global_step == 5 and resumed.skipped_steps == 1
    guards = {name: spec.instance for name, spec in plugins.guards.items()}
    assert guards["nonfinite"].total == 1 and guards["nonfinite"].consecutive == 0
    assert guards["grad_norm"].alert_stats.count == saved["grad_norm"]["alert"]["count"] + 2
    assert guards["spike"].state_dict()["losses"][:2] == saved["spike"]["losses"] and len(guards["spike"].losses) == 4
    logged = json.loads((resumed.output_dir / "trainer_state.json").read_text())["log_history"]
    assert [e["stabguard/nonfinite_steps"] for e in logged if e.get("step") in (4, 5) and "loss" in e] == [1, 1]
