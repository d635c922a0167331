"""stabguard/step.py: the guarded step's actions on the real tiny Qwen3-VL.

The snapshot is restored bit for bit; a STOP keeps the last verified state and a resume continues from
it; data hooks get verdicts; a hook that raises stops the run with its name; a notifier that raises does
not; the final train_loss averages the trained steps; the same seed gives the same run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from support import tiny_recipe, write_recipe
from support_faults import StepProbe, StopAt, guard_plugins, run_guarded, same_state, trainable_state

import stabguard.runner
from stabguard import GuardError, Verdict, hookimpl
from stabguard.checkpoints import verify
from stabguard.cli.run import command
from stabguard.events import read_events
from stabguard.step import Snapshot, merge_ranks
from stabguard.verdict import Action


def test_a_snapshot_restores_weights_and_optimizer_state_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    state = lambda: ({i: p.detach().clone() for i, p in enumerate(trainable)},  # noqa: E731
                     {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(trainable)})
    for _ in range(2):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    kept, snapshot = state(), Snapshot(2, trainable, optimizer, offload=True)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    assert not same_state(state(), kept)
    snapshot.restore(optimizer)
    assert same_state(state(), kept) and len(snapshot.params) == 3, "frozen weights are not part of it"


def test_the_ranks_verdicts_merge_without_repeating_a_guard_and_name_the_rank_when_they_differ():
    same = Verdict(Action.SKIP, "nonfinite: non-finite gradients", "nonfinite")
    assert merge_ranks([same, same]) == same, "one reason, as a single rank would log it"
    other = Verdict(Action.SKIP, "spike: loss 9.1", "spike")
    merged = merge_ranks([Verdict.proceed(), same, other])
    assert merged.action == Action.SKIP and merged.guard == ("nonfinite", "spike") and merged.by == "nonfinite,spike"
    assert merged.reason == "rank 1: nonfinite: non-finite gradients; rank 2: spike: loss 9.1"
    assert merge_ranks([same, Verdict(Action.STOP, "core: 20 steps skipped", "core", "refused")]).error == "refused"
    assert merge_ranks([Verdict(Action.SKIP, "x", None), same]).guard == ("nonfinite",), "a guard of None is no guard"


def test_a_stop_saves_the_last_verified_state_and_a_resume_continues_from_it(tmp_path, tiny_assets):
    probe = StepProbe(keep={2, 3})
    first, _ = run_guarded(tmp_path, tiny_assets, StopAt(k=4), probe, training={"max_steps": 6})
    assert not first.ok and first.stop_reason == "step 4: stop-at: test says stop"
    checkpoint = first.output_dir / "checkpoint-3"
    saved = json.loads((checkpoint / "stabguard_state.json").read_text())
    # Step 4's loss came from the weights after step 3, and the guard rejected it: they are not verified.
    assert saved["verified_step"] == 2 and saved["run"] == first.run_id
    now = SimpleNamespace(model=first.trainer.model, optimizer=first.trainer.optimizer)
    assert same_state(trainable_state(now), probe.after[2]), "the state saved is the one after step 2"
    (stop,) = [e for e in read_events(first.output_dir / "events.jsonl") if e["kind"] == "stop"]
    assert stop["values"]["verified"] and stop["values"]["checkpoint"].endswith("checkpoint-3")

    resumed, _ = run_guarded(tmp_path, tiny_assets, training={"max_steps": 6}, resume=str(checkpoint))
    assert resumed.ok and resumed.global_step == 6 and resumed.run_id != first.run_id
    restored = [e for e in read_events(first.output_dir / "events.jsonl") if "guard state restored" in e["message"]]
    assert restored and restored[0]["values"]["previous_run"] == first.run_id


def test_a_regular_checkpoint_of_the_stopped_state_is_set_aside_not_lost(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, StopAt(k=4), training={"max_steps": 6, "save_steps": 3})
    assert not result.ok
    aside = result.output_dir / "unverified-checkpoint-3"
    assert (aside / "stabguard_state.json").exists(), "the regular checkpoint of step 3 is kept, renamed"
    assert json.loads((result.output_dir / "checkpoint-3" / "stabguard_state.json").read_text())["verified_step"] == 2
    assert verify(result.output_dir / "checkpoint-3").status == verify(aside).status == "verified", (
        "the STOP's checkpoint is committed with a manifest, as every save is; the one set aside keeps its own")


class SkipBatch:
    """A data guard: the micro-batch holding sample ``bad`` gets a SKIP verdict."""

    def __init__(self, bad: str):
        self.bad = bad

    @hookimpl
    def post_collate(self, samples):
        if any(s["id"] == self.bad for s in samples):
            return Verdict.skip(f"sample {self.bad} looks wrong", "skip-batch")


def test_a_data_verdict_skips_the_step_that_trains_on_that_batch(tmp_path, tiny_assets):
    bad = f"{tiny_assets['train']}:3"  # one of the 6 rows; batch size 1, 6 steps: every row is trained once
    probe = StepProbe()
    result, _ = run_guarded(tmp_path, tiny_assets, SkipBatch(bad), probe, training={"max_steps": 6})
    (skip,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "skip"]
    assert result.ok and skip["guard"] == "skip-batch" and skip["values"]["step_samples"] == [bad]
    assert probe.verdicts[skip["step"]] == "SKIP" and list(probe.verdicts.values()).count("SKIP") == 1


class RaisesAt:
    def __init__(self, hook_step, exc):
        self.hook_step, self.exc = hook_step, exc

    @hookimpl
    def pre_step(self, state):
        if state.step == self.hook_step:
            raise self.exc


@pytest.mark.parametrize("exc, code, word", [(KeyError("lost"), 4, "a plugin failed"),
                                             (GuardError("my-guard: this data is wrong"), 1, "refused")])
def test_a_hook_that_raises_ends_the_run_with_its_name_and_a_checkpoint(tmp_path, tiny_assets, monkeypatch,
                                                                         exc, code, word):
    real_run, plugin = stabguard.runner.run, RaisesAt(3, exc)
    monkeypatch.setattr(stabguard.runner, "run", lambda recipe, resume=None, heal=False: real_run(
        recipe, resume=resume, plugins=guard_plugins(plugin)))
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, tmp_path / "out",
                                                                training={"max_steps": 5}))
    result = CliRunner().invoke(command, [str(recipe)])
    assert result.exit_code == code, result.output
    assert f"stabguard: {word} at step 3: " in result.output
    assert "hook pre_step of plugin 'fault-0', rank 0" in result.output
    events = read_events(tmp_path / "out" / "events.jsonl")
    (error,) = [e for e in events if e["kind"] == "error"]
    assert error["values"]["hook"] == "pre_step" and error["values"]["exception"] == type(exc).__name__
    (stop,) = [e for e in events if e["kind"] == "stop"]
    assert stop["values"]["checkpoint"].endswith("checkpoint-2")


class LoudNotifier:
    def __init__(self):
        self.alerts = []

    @hookimpl
    def on_alert(self, alert):
        self.alerts.append(alert.message)
        raise ConnectionError("the chat server is down")


def test_a_notifier_that_raises_is_an_error_event_and_training_goes_on(tmp_path, tiny_assets):
    notifier = LoudNotifier()
    result, _ = run_guarded(tmp_path, tiny_assets, notifier, training={"max_steps": 3},
                            guards={"grad_norm": {"alert_above": 1e-6}})  # every step alerts
    assert result.ok and result.global_step == 3
    assert len(notifier.alerts) == 3, "on_alert fires once per alert"
    errors = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "error"]
    assert len(errors) == 3 and "the chat server is down" in errors[0]["message"]
    assert errors[0]["guard"] == "fault-0"


def test_the_final_train_loss_averages_the_trained_steps(tmp_path, tiny_assets):
    probe = StepProbe()
    result, _ = run_guarded(tmp_path, tiny_assets, StopAt(k=99), probe, SkipAtSteps({2, 3}),
                            training={"max_steps": 5})
    summary = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"][-1]
    trained = [probe.losses[s] for s in (1, 4, 5)]
    assert summary["train_loss"] == pytest.approx(sum(trained) / 3, rel=1e-5)


class SkipAtSteps:
    def __init__(self, steps):
        self.steps = steps

    @hookimpl
    def pre_step(self, state):
        if state.step in self.steps:
            return Verdict.skip("test", "skip-at")


def test_the_same_seed_gives_the_same_losses_and_grad_norms_first_run_included(tmp_path):
    """LoRA's initialisation, the data order and dropout all follow training.seed. The first run builds
    the tiny model and the data (which draws random numbers); every later run reuses them: all train alike."""
    assets = {"model": tmp_path / "assets" / "model", "train": tmp_path / "assets" / "data" / "train.jsonl"}

    def run_with_seed(name: str, seed: int):
        probe = StepProbe()
        recipe = tiny_recipe(assets, tmp_path / name / "out", training={"max_steps": 4, "seed": seed})
        recipe["model"]["tiny"] = {"seed": 0}
        recipe["data"]["synth"] = {"n": 6, "seed": 0, "size": 128}
        (tmp_path / name).mkdir()
        stabguard.runner.run(write_recipe(tmp_path / name / "recipe.toml", recipe), plugins=guard_plugins(probe))
        return probe.losses, probe.norms

    first = run_with_seed("first", 7)
    assert (assets["model"] / "config.json").is_file(), "the first run built the model"
    assert first == run_with_seed("second", 7), "a run that reuses the built assets trains like the first"
    assert run_with_seed("other", 8)[1] != first[1], "a different seed gives a different run (the test can fail)"


# ---- GuardedStep alone: a fake engine and host, every verdict in milliseconds -------------------------


class FakeSnapshot:
    def __init__(self, step, guard_state):
        self.step, self.guard_state, self.restores = step, guard_state, 0

    def restore(self, optimizer):
        self.restores += 1


class FakeEngine:
    """Records what the step asked of it; the norm is whatever the test sets."""

    def __init__(self):
        self.norm, self.calls, self.snapshots = torch.tensor(0.5), [], []

    def grad_norm(self, model):
        return self.norm

    def clip(self, model, max_norm, norm):
        self.calls.append(("clip", float(max_norm)))

    def proceed(self, optimizer):
        self.calls.append(("proceed",))

    def drop(self, model, optimizer):
        self.calls.append(("drop",))

    def snapshot(self, step, model, optimizer, offload, guard_state):
        self.snapshots.append(FakeSnapshot(step, guard_state))
        return self.snapshots[-1]

    def tensor_norms(self, model):
        self.calls.append(("tensor_norms",))
        return ["m.layers.0.q.lora_A.default.weight", "m.layers.0.q.lora_B.default.weight"], torch.tensor([0.3, 0.4])

    def replayable(self, model):
        return False

    def missing_gradients(self, model):
        return []


class FakeHost:
    optimizer = None

    def __init__(self, max_norm=1.0):
        self.step, self.max_norm, self.saved, self.ended = 0, max_norm, [], False

    def next_step(self):
        return self.step + 1

    def max_grad_norm(self):
        return self.max_norm

    def unscale_gradients(self):
        pass

    def save_stopped(self, model):
        self.saved.append(self.step)
        return f"checkpoint-{self.step}"

    def end_training(self):
        self.ended = True

    def replay_model(self, model):
        return model

    def lr(self):
        return 1e-3

    def peak_lr(self):
        return 1e-3


class Says:
    """A guard that answers each step with the verdict its script gives (and counts rollbacks)."""

    def __init__(self, script):
        self.script, self.rolled_back_to = script, []

    @hookimpl
    def pre_step(self, state):
        make = self.script.get(state.step)
        return make() if make else None

    @hookimpl
    def on_rollback(self, restored_step):
        self.rolled_back_to.append(restored_step)

    @hookimpl
    def state_dict(self):
        return {"rolled_back_to": list(self.rolled_back_to)}


def run_steps(script, steps, *, every=1, max_skips=20):
    from stabguard.events import EventLog
    from stabguard.step import GuardedStep

    says, events = Says(script), EventLog()
    step = GuardedStep(guard_plugins(says, guards=()), events, max_consecutive_skips=max_skips, snapshot_every=every)
    host, engine, states = FakeHost(), FakeEngine(), []
    for _ in range(steps):
        step.add_micro_batch([f"s{host.step + 1}"], None)
        step.add_loss(torch.tensor(1.0))
        states.append(step.run(host, None, engine))
        host.step += 1
        if host.ended:
            break
    return step, host, engine, states, events, says


def test_proceed_snapshots_when_due_clips_and_updates():
    step, host, engine, states, events, _ = run_steps({}, 5, every=2)
    assert [s.verdict.action for s in states] == [Action.PROCEED] * 5
    assert [snap.step for snap in engine.snapshots] == [0, 2, 4], "the state before each due update: verified"
    assert engine.calls.count(("clip", 1.0)) == 5 and engine.calls.count(("proceed",)) == 5
    assert not events.events, "a step that proceeds writes no event"


def test_skip_drops_the_update_and_is_counted_and_recorded():
    step, host, engine, states, events, _ = run_steps({2: lambda: Verdict.skip("bad", "g")}, 3)
    assert [c for c in engine.calls if c[0] != "clip"] == [("proceed",), ("tensor_norms",), ("drop",), ("proceed",)]
    assert step.skipped_steps == 1 and step.rollbacks == 0 and len(engine.snapshots) == 2
    (skip,) = events.of_kind("skip")
    assert skip["guard"] == "g" and skip["step"] == 2 and skip["values"]["step_samples"] == ["s2"]
    assert skip["values"]["loss"] == 1.0 and skip["values"]["grad_norm"] == 0.5
    assert skip["values"]["where"]["modules"][0] == ["m.layers.0.q", "lora_B", 0.64], "where the norm came from"
    assert skip["message"].endswith("[where: m.layers.0.q (lora_B) 64%, m.layers.0.q (lora_A) 36%]")
    assert engine.calls.count(("tensor_norms",)) == 1, "healthy steps gather nothing; the skip, before its drop"


def test_a_guard_can_ask_where_a_step_that_proceeds_came_from():
    class Asks:
        @hookimpl
        def pre_step(self, state):
            if state.step == 2:
                state.ask_where()

    from stabguard.events import EventLog
    from stabguard.step import GuardedStep

    step = GuardedStep(guard_plugins(Asks(), guards=()), EventLog())
    host, engine, states = FakeHost(), FakeEngine(), []
    for _ in range(3):
        step.add_loss(torch.tensor(1.0))
        states.append(step.run(host, None, engine))
        host.step += 1
    assert [s.where is not None for s in states] == [False, True, False]
    assert states[1].where.modules[0][:2] == ("m.layers.0.q", "lora_B") and states[1].verdict.action == Action.PROCEED


def test_rollback_restores_the_verified_snapshot_and_names_the_undone_samples():
    step, host, engine, states, events, says = run_steps({4: lambda: Verdict.rollback("spike", "g")}, 4, every=2)
    assert says.rolled_back_to == [2] and engine.snapshots[-1].restores == 1 and states[-1].restored_step == 2
    (rollback,) = events.of_kind("rollback")
    assert rollback["values"]["undone_samples"] == {"3": ["s3"]}, "the update of step 3 is undone"
    assert rollback["values"]["skipped_samples"] == ["s4"] and step.rollbacks == 1 and step.skipped_steps == 0


def test_a_rollback_before_any_snapshot_is_a_skip():
    step, host, engine, states, events, says = run_steps({1: lambda: Verdict.rollback("spike", "g")}, 1, every=0)
    assert says.rolled_back_to == [] and states[0].restored_step is None
    assert "no verified snapshot yet" in events.of_kind("rollback")[0]["message"]


def test_stop_restores_saves_and_ends_with_the_snapshot_s_guard_state():
    script = {2: lambda: Verdict.rollback("spike", "g"), 3: lambda: Verdict.stop("enough", "g")}
    step, host, engine, states, events, _ = run_steps(script, 5)
    assert host.ended and host.saved == [2] and len(states) == 3, "the run ends at the STOP"
    assert states[-1].restored_step == 0 and engine.snapshots[-1].restores == 2, "the state step 1's loss judged"
    saved = step.state_dict()
    assert saved["verified_step"] == 0 and saved["plugins"]["fault-0"] == {"rolled_back_to": []}, (
        "the checkpoint's guard state is the snapshot's moment, not the rolled-back present")
    (stop,) = events.of_kind("stop")
    assert stop["values"]["checkpoint"] == "checkpoint-2" and step.stopped.reason == "step 3: g: enough"


def test_too_many_skips_in_a_row_stop_whoever_asks():
    step, host, engine, states, events, _ = run_steps({s: lambda: Verdict.skip("bad", "g") for s in range(1, 9)}, 8,
                                                     max_skips=3)
    assert [s.verdict.action for s in states] == [Action.SKIP, Action.SKIP, Action.STOP]
    assert states[-1].verdict.reason.startswith("3 steps skipped in a row; last: g: bad")


def test_a_hook_that_raises_stops_the_run_naming_it():
    def boom():
        raise ValueError("a bug")

    step, host, engine, states, events, _ = run_steps({2: boom}, 4)
    assert states[-1].step == 2 and states[-1].verdict.action == Action.STOP and states[-1].verdict.error == "crash"
    (error,) = events.of_kind("error")
    assert error["values"]["hook"] == "pre_step" and "ValueError: a bug" in states[-1].verdict.reason


def test_the_step_s_checkpoint_state_round_trips():
    step, *_ = run_steps({2: lambda: Verdict.skip("bad", "g"), 3: lambda: Verdict.rollback("x", "g")}, 4)
    saved = step.state_dict()
    again, *_ = run_steps({}, 0)
    again.load_state_dict(saved)
    assert (again.skipped_steps, again.rollbacks, again.consecutive_skips) == (1, 1, 0)


def test_a_wholly_quarantined_micro_batch_does_not_lower_the_step_loss_and_a_step_of_them_is_skipped():
    from stabguard.events import EventLog
    from stabguard.step import GuardedStep

    step = GuardedStep(guard_plugins(guards=()), EventLog())
    host, engine = FakeHost(), FakeEngine()
    step.add_micro_batch([], None, quarantined=True)  # its loss is exactly 0 (GuardTrainer.compute_loss)
    step.add_loss(torch.tensor(0.0))
    step.add_micro_batch(["s2"], None)
    step.add_loss(torch.tensor(3.5))  # as the Trainer scales it for 2 micro-batches
    mixed = step.run(host, None, engine)
    assert mixed.verdict.action == Action.PROCEED and mixed.host()["loss"] == 7.0, "the mean of the kept one"
    host.step += 1
    step.add_micro_batch([], None, quarantined=True)
    step.add_loss(torch.tensor(0.0))
    empty = step.run(host, None, engine)
    assert empty.verdict.action == Action.SKIP and "every sample of this step is quarantined" in empty.verdict.reason
