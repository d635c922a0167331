"""plugins/spike.py: in-memory snapshots, rollback on a loss spike, the skipped samples, stop after R."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from support_faults import GradFault, LossFault, PoisonBatch, StepProbe, run_guarded, same_state

from stabguard import EventLog, Verdict
from stabguard.events import read_events
from stabguard.plugins.spike import Options, SpikeGuard
from stabguard.trainer import StepState
from stabguard.verdict import Action, combine

NAN = float("nan")
FAST = {"every": 2, "window": 5, "min_history": 3, "z": 8.0}


class Toy:
    """A small model (one frozen layer) and AdamW, stepped the way the core steps."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        self.model[0].weight.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=0.1)

    def step(self, guard, events, step, loss, others=()):
        self.model(torch.randn(8, 4)).pow(2).mean().backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        state = StepState(step=step, grad_norm=torch.nn.utils.get_total_norm(grads), loss=torch.tensor(loss),
                          model=self.model, optimizer=self.optimizer)
        state.verdict = combine([guard.pre_step(state=state), *others])
        if state.verdict.action == Action.PROCEED:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        guard.on_step_end(state=state, events=events)
        return state.verdict

    def copy(self):
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        optim = {id(p): {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        return params, optim


def same(a, b) -> bool:
    (pa, oa), (pb, ob) = a, b
    return (all(torch.equal(pa[n], pb[n]) for n in pa) and oa.keys() == ob.keys()
            and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i]))


def warm_up(toy, guard, events, steps=5):
    """Steps 1..steps with a calm loss; returns the copy of the state after each."""
    copies = {}
    for step in range(1, steps + 1):
        assert toy.step(guard, events, step, 1.0 + 0.01 * (step % 3)).action == Action.PROCEED
        copies[step] = toy.copy()
    return copies


def test_loss_spike_restores_the_snapshot_bit_for_bit():
    toy, guard, events = Toy(), SpikeGuard(Options(**FAST)), EventLog()
    copies = warm_up(toy, guard, events)  # snapshots after steps 2 and 4
    verdict = toy.step(guard, events, 6, 50.0)
    assert verdict.action == Action.SKIP and "sigma above the mean" in verdict.reason
    assert "snapshot of step 4" in verdict.reason and same(toy.copy(), copies[4])
    (rollback,) = events.of_kind("rollback")
    assert rollback["step"] == 6 and rollback["values"]["snapshot_step"] == 4
    assert list(rollback["values"]["undone_samples"]) == ["5"]
    assert toy.model[0].weight.requires_grad is False  # frozen weights are not part of the snapshot
    assert len(guard.snapshot.params) == 3


def test_the_agreed_verdict_decides_the_restore():
    """Another rank's spike (agreed SKIP naming spike) restores here too; another guard's SKIP does not."""
    toy, guard, events = Toy(), SpikeGuard(Options(**FAST)), EventLog()
    copies = warm_up(toy, guard, events)
    toy.step(guard, events, 6, 1.0, others=[Verdict.skip("NaN loss on rank 1", "nonfinite")])
    assert same(toy.copy(), copies[5]) and events.of_kind("rollback") == []
    toy.step(guard, events, 7, 1.0, others=[Verdict.skip("loss spike on rank 1", "spike")])
    assert same(toy.copy(), copies[4]) and len(events.of_kind("rollback")) == 1


def test_stops_after_max_rollbacks_within_the_window():
    toy, guard, events = Toy(), SpikeGuard(Options(**FAST, max_rollbacks=2, rollback_window=3)), EventLog()
    warm_up(toy, guard, events)
    assert [toy.step(guard, events, s, 50.0).action for s in (6, 7)] == [Action.SKIP, Action.SKIP]
    verdict = toy.step(guard, events, 8, 50.0)
    assert verdict.action == Action.STOP and "after 2 rollbacks within 3 steps" in verdict.reason
    assert toy.step(guard, events, 10, 50.0).action == Action.SKIP  # step 7's rollback has left the window


def test_nonfinite_streak_rolls_back_to_a_state_before_any_optimizer_step():
    toy, guard, events = Toy(), SpikeGuard(Options(every=100, nonfinite_streak=2)), EventLog()
    start = toy.copy()
    toy.step(guard, events, 1, 1.0)
    assert toy.optimizer.state and toy.step(guard, events, 2, NAN).action == Action.PROCEED
    verdict = toy.step(guard, events, 3, NAN)
    assert verdict.action == Action.SKIP and "2 non-finite steps in a row" in verdict.reason
    assert same(toy.copy(), start) and not toy.optimizer.state  # AdamW starts afresh, as it did then


def test_samples_are_attributed_to_the_forward_that_trains_on_them():
    guard = SpikeGuard(Options())
    guard.configure(recipe=SimpleNamespace(data=SimpleNamespace(val="data/val.jsonl")))
    model = torch.nn.Linear(2, 2)
    guard.setup_model(model=model)
    for ids in (["t:1", "t:2"], ["data/val.jsonl:1"], ["t:3"], ["t:4"]):  # collated ahead of training
        guard.post_collate(samples=[{"id": i} for i in ids])
    model(torch.zeros(2))
    model.eval()
    model(torch.zeros(2))  # evaluation consumes nothing
    model.train()
    model(torch.zeros(2))
    assert guard.step_ids == ["t:1", "t:2", "t:3"] and list(guard.pending) == [["t:4"]]


def test_options_are_validated_by_name():
    with pytest.raises(ValidationError) as err:
        Options(window=10, min_history=20, every=0, colour="red")
    errors = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert set(errors) == {"min_history", "every", "colour"}
    assert "min_history (20) must not exceed window (10)" in errors["min_history"]


def test_state_round_trips_through_json():
    toy, guard, events = Toy(), SpikeGuard(Options(**FAST)), EventLog()
    warm_up(toy, guard, events)
    toy.step(guard, events, 6, 50.0)
    restored = SpikeGuard(Options(**FAST))
    restored.load_state_dict(state=json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict() and restored.rollbacks == [6]


# -- real faults in a real tiny run ----------------------------------------------------------------

def test_loss_spike_in_a_real_run_rolls_back_and_names_the_skipped_samples(tmp_path, tiny_assets):
    batches, probe = PoisonBatch(at=()), StepProbe(keep=range(1, 9))  # PoisonBatch only records the ids
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={6}, scale=50.0), batches, probe,
                            training={"max_steps": 8}, guards={"spike": FAST})
    assert result.ok and result.skipped_steps == 1 and probe.steps("SKIP") == [6]
    assert same_state(probe.after[6], probe.after[4]), "step 6 must end with the snapshot of step 4"
    assert not same_state(probe.after[6], probe.before[6])
    assert probe.lrs[7] == probe.lrs[6]
    events = read_events(result.output_dir / "events.jsonl")
    (rollback,) = [e for e in events if e["kind"] == "rollback"]
    assert rollback["step"] == 6 and rollback["values"]["snapshot_step"] == 4
    assert rollback["values"]["skipped_samples"] == batches.ids[5]
    assert rollback["values"]["undone_samples"] == {"5": batches.ids[4]}
    assert [(e["guard"], e["step"]) for e in events if e["kind"] == "skip"] == [("spike", 6)]


def test_repeated_spikes_stop_the_run_with_a_checkpoint(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6, 7}, scale=50.0),
                            training={"max_steps": 10}, guards={"spike": {**FAST, "max_rollbacks": 2}})
    assert result.stop_reason.startswith("step 7: spike: loss") and "after 2 rollbacks" in result.stop_reason
    assert (result.output_dir / "checkpoint-6" / "stabguard_state.json").exists()
    events = read_events(result.output_dir / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "rollback"] == [5, 6]


def test_nonfinite_streak_rolls_back_before_nonfinite_stops(tmp_path, tiny_assets):
    probe = StepProbe(keep={2, 4})
    result, _ = run_guarded(tmp_path, tiny_assets, GradFault(at={3, 4}, value=NAN), probe,
                            training={"max_steps": 6}, guards={"nonfinite": {"max_consecutive": 3},
                                                               "spike": {**FAST, "nonfinite_streak": 2}})
    assert result.ok and probe.steps("SKIP") == [3, 4]
    assert same_state(probe.after[4], probe.after[2])
    (rollback,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "rollback"]
    assert rollback["step"] == 4 and "2 non-finite steps in a row" in rollback["message"]
