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
    monkeypatch.setattr(stabguard.runner, "run", lambda recipe, resume=None: real_run(
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
