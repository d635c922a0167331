"""Recovery (stabguard/recovery.py): each trouble made to happen on the tiny model, and the run healed."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabguard import Remedy, hookimpl
from stabguard.events import EventLog, read_events
from stabguard.recipe import RecoverySection
from stabguard.recovery import Recovery
from stabguard.testing import LossFault, StepProbe
from support_faults import run_guarded

import stabguard.faults as faults_plugin

SPIKE = {"window": 8, "min_history": 3, "z": 8.0, "max_rollbacks": 1}


def spiking(assets, line: int) -> str:
    """The id of the training sample on ``line`` (``path:line``), as the trainer names it."""
    return f"{assets['train']}:{line}"


class Samples:
    """Each step's samples and verdict, as the guards saw them (the step's sample ids)."""

    def __init__(self):
        self.steps: dict[int, tuple[str, list[str]]] = {}

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        self.steps[state.step] = (state.verdict.action.name, list(state.samples))


def remedies(output_dir) -> list[dict]:
    return [e for e in read_events(output_dir / "events.jsonl") if e["kind"] == "remedy"]


def diagnoses(output_dir) -> dict[int, dict]:
    return {e["step"]: e["values"] for e in read_events(output_dir / "events.jsonl") if e["kind"] == "diagnosis"}


def test_a_sample_that_spikes_every_time_is_quarantined_on_its_own_evidence_removed_and_the_run_finishes(
        tmp_path, tiny_assets):
    bad, seen = spiking(tiny_assets, 5), Samples()
    faults = {"faults": {"spike_samples": ["train.jsonl:5"]}}
    result, _ = run_guarded(tmp_path / "healed", tiny_assets, seen, faults_plugin, training={"max_steps": 30},
                            guards={"spike": SPIKE, **faults})
    assert result.ok, result.stop_reason
    (quarantine,) = remedies(result.output_dir)
    assert quarantine["values"]["remedy"] == "quarantine" and quarantine["values"]["samples"] == [bad]
    rejected = [s for s, (verdict, samples) in seen.steps.items() if bad in samples and verdict != "PROCEED"]
    assert quarantine["step"] == rejected[0], "quarantined at its first rejected step: the replay is the evidence"
    found = diagnoses(result.output_dir)[rejected[0]]
    assert found["diagnosis"] == "concentrated" and found["samples"] == [bad] and "high on their own" in found["said"]
    later = {s: v for s, v in seen.steps.items() if s > quarantine["step"]}
    assert all(bad not in samples for _, samples in later.values()), "never trained on again"
    assert {verdict for verdict, _ in later.values()} <= {"PROCEED", "SKIP"}, "no spike after the quarantine"
    events = read_events(result.output_dir / "events.jsonl")
    assert any(e["values"].get("removed") == [bad] for e in events), "it still came in its batch, and was removed"

    stopped, _ = run_guarded(tmp_path / "today", tiny_assets, faults_plugin, training={"max_steps": 30},
                             guards={"spike": SPIKE, **faults}, recovery={"enabled": False})
    assert not stopped.ok and "after 1 rollbacks" in stopped.stop_reason, "without recovery the same run stops"


@pytest.mark.parametrize("fault", ["spike_samples", "poison_batch_samples"])
def test_only_the_culprit_leaves_a_batch_it_damages_row_local_or_batch_wide(tmp_path, tiny_assets, fault):
    bad, seen = spiking(tiny_assets, 2), Samples()  # first trained at step 3, beside line 5
    result, _ = run_guarded(tmp_path, tiny_assets, seen, faults_plugin,
                            training={"max_steps": 12, "per_device_train_batch_size": 2},
                            guards={"spike": {**SPIKE, "min_history": 2}, "faults": {fault: ["train.jsonl:2"]}})
    assert result.ok, result.stop_reason
    (quarantine,) = remedies(result.output_dir)
    assert quarantine["values"]["samples"] == [bad], "its neighbours stay, though their loss rose with it"
    step = quarantine["step"]
    (neighbour,) = [s for s in seen.steps[step][1] if s != bad]
    found = diagnoses(result.output_dir)[step]
    assert found["diagnosis"] == "concentrated"
    assert f"{neighbour} " in found["said"] if fault == "poison_batch_samples" else neighbour not in found["said"]
    assert all(bad not in samples for s, (_, samples) in seen.steps.items() if s > step)
    assert all(verdict == "PROCEED" for s, (verdict, _) in seen.steps.items() if s > step)


def test_two_culprits_in_one_step_look_like_the_weights_and_each_is_named_at_its_next_step(tmp_path, tiny_assets):
    """Lines 2 and 5 share step 3: every sample of it is high on its own (spread: the weights, not the data),
    so neither is quarantined there; at their next steps each sits beside an innocent one and is named."""
    seen = Samples()
    result, _ = run_guarded(tmp_path, tiny_assets, seen, faults_plugin,
                            training={"max_steps": 9, "per_device_train_batch_size": 2},
                            guards={"spike": {**SPIKE, "min_history": 2, "max_rollbacks": 5},
                                    "faults": {"spike_samples": ["train.jsonl:2", "train.jsonl:5"]}})
    assert result.ok, result.stop_reason
    found = diagnoses(result.output_dir)
    assert found[3]["diagnosis"] == "spread" and found[3]["samples"] == [], "no quarantine without a contrast"
    named = {e["step"]: e["values"]["samples"] for e in remedies(result.output_dir)}
    assert sorted(s for samples in named.values() for s in samples) == [spiking(tiny_assets, 2),
                                                                      spiking(tiny_assets, 5)]
    assert all(step > 3 for step in named)


def test_a_one_off_spike_is_a_transient_recorded_and_nothing_is_quarantined(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={6}, scale=50.0), training={"max_steps": 9},
                            guards={"spike": SPIKE})
    assert result.ok and not remedies(result.output_dir) and not result.trainer.guarded.recovery.quarantined
    found = diagnoses(result.output_dir)[6]
    assert found["diagnosis"] == "transient" and "gone on replay" in found["said"]
    assert result.trainer.guarded.recovery.rejected == [[6, "transient"]]
    (hardware,) = [e for e in read_events(result.output_dir / "events.jsonl") if "hardware" in e["values"]]
    assert hardware["step"] == 6, "a one-off the replay cannot reproduce: the step's loss differs from it"


class ReplayNoise:
    """Silent data corruption: a forward without gradients (a replay) returns another loss than training."""

    @hookimpl
    def setup_model(self, model):
        model.register_forward_hook(self.shift)

    @staticmethod
    def shift(module, args, output):
        if torch.is_grad_enabled() or getattr(output, "loss", None) is None:
            return None
        output.loss = output.loss + 0.5
        return output


def test_a_replay_of_the_same_weights_that_differs_from_the_step_names_the_hardware_and_the_rank(
        tmp_path, tiny_assets):
    faults = {"faults": {"spike_samples": ["train.jsonl:5"]}}
    result, _ = run_guarded(tmp_path, tiny_assets, faults_plugin, ReplayNoise(), training={"max_steps": 7},
                            guards={"spike": SPIKE, **faults}, lora={"dropout": 0.3})
    (found,) = [e for e in read_events(result.output_dir / "events.jsonl") if "hardware" in e["values"]]
    assert found["step"] == 6 and found["values"]["hardware"]["rank"] == 0
    assert "non-deterministic hardware or silent data corruption" in found["message"]
    assert found["values"]["hardware"]["replay"] != pytest.approx(found["values"]["hardware"]["step"])


def test_a_replay_of_the_same_weights_inputs_and_rng_gives_the_steps_own_loss(tmp_path, tiny_assets):
    """With LoRA dropout on: the RNG state each forward started from is replayed too, so nothing differs."""
    faults = {"faults": {"spike_samples": ["train.jsonl:5"]}}
    result, _ = run_guarded(tmp_path, tiny_assets, faults_plugin, training={"max_steps": 7, "learning_rate": 1e-2},
                            guards={"spike": SPIKE, **faults}, lora={"dropout": 0.3},
                            recovery={"replay_tolerance": 0.0})  # bit for bit: other dropout masks would show
    assert result.ok and diagnoses(result.output_dir)[6]["diagnosis"] == "concentrated"
    assert not [e for e in read_events(result.output_dir / "events.jsonl") if "hardware" in e["values"]]


def test_a_healthy_run_is_untouched(tmp_path, tiny_assets):
    on, off = StepProbe(), StepProbe()
    first, _ = run_guarded(tmp_path / "on", tiny_assets, on, training={"max_steps": 6}, guards={"spike": SPIKE})
    second, _ = run_guarded(tmp_path / "off", tiny_assets, off, training={"max_steps": 6}, guards={"spike": SPIKE},
                            recovery={"enabled": False})
    assert first.ok and second.ok and not remedies(first.output_dir)
    assert on.losses == off.losses and on.norms == off.norms and on.lrs == off.lrs  # bit for bit


def test_a_burst_of_transients_at_a_healable_stop_cools_the_rate_below_where_it_broke_then_the_budget_stops(
        tmp_path, tiny_assets):
    probe = StepProbe()
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6, 7, 8}, scale=50.0), probe,
                            training={"max_steps": 12}, guards={"spike": SPIKE},
                            recovery={"remedies": ["cool_down", "tighten_clip"], "budget": 2})
    applied = remedies(result.output_dir)
    assert [(e["step"], e["values"]["remedy"]) for e in applied] == [(6, "cool_down"), (7, "tighten_clip")]
    cool, clip = (e["values"] for e in applied)
    assert cool["broke_at"] == 5, "the burst began at step 5"
    assert cool["peak_after"] == pytest.approx(cool["broke_lr"] / 10) and (clip["before"], clip["after"]) == (1.0, 0.5)
    assert probe.verdicts[5] == probe.verdicts[6] == probe.verdicts[7] == "ROLLBACK"
    assert probe.lrs[7] == pytest.approx(probe.lrs[6] * cool["peak_after"] / cool["peak_before"])
    assert result.stop_reason.startswith("step 8: spike:") and "recovery budget spent (2 remedies" in result.stop_reason
    saved = json.loads((result.output_dir / "checkpoint-7" / "stabguard_state.json").read_text())
    assert saved["verified_step"] == 3 and saved["recovery"]["clip"] == 0.5
    assert saved["recovery"]["cool"]["factor"] == pytest.approx(cool["peak_after"] / cool["peak_before"])


def test_a_remedy_that_did_not_help_is_not_chosen_again(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6, 7, 8}, scale=50.0),
                            training={"max_steps": 12}, guards={"spike": SPIKE},
                            recovery={"remedies": ["tighten_clip"], "budget": 3})
    assert [(e["step"], e["values"]["remedy"]) for e in remedies(result.output_dir)] == [(6, "tighten_clip")]
    assert "no remedy left for this evidence" in result.stop_reason and result.stop_reason.startswith("step 7")


def test_a_cool_down_survives_a_resume_mid_way(tmp_path, tiny_assets):
    cooling = {"remedies": ["cool_down"], "cool_steps": 4, "burst_steps": 1}
    whole, part = StepProbe(), StepProbe()
    first, _ = run_guarded(tmp_path / "whole", tiny_assets, LossFault(at={5, 6}, scale=50.0), whole,
                           training={"max_steps": 12, "save_steps": 4}, guards={"spike": SPIKE}, recovery=cooling)
    cool, ended = remedies(first.output_dir)
    assert cool["step"] == 6 and cool["values"]["remedy"] == "cool_down" and cool["values"]["until"] == 10
    assert ended["step"] == 11 and ended["values"]["remedy"] == "cool_down_end"
    checkpoint = first.output_dir / "checkpoint-8"  # mid-way: cooled since step 6, until step 10
    assert json.loads((checkpoint / "stabguard_state.json").read_text())["recovery"]["cool"]["until"] == 10
    second, _ = run_guarded(tmp_path / "part", tiny_assets, part, training={"max_steps": 12, "save_steps": 4},
                            guards={"spike": SPIKE}, recovery=cooling, resume=str(checkpoint))
    assert second.ok and sorted(part.lrs) == [9, 10, 11, 12]
    assert all(part.lrs[s] == whole.lrs[s] for s in part.lrs), (part.lrs, whole.lrs)
    assert part.lrs[11] > part.lrs[10], "the cool-down ended after step 10 in the resumed run too"


class SmallerSteps:
    """A third-party guard's remedy: halve its own step budget, proposed at a healable STOP."""

    def __init__(self):
        self.steps, self.seen = 8, []

    @hookimpl
    def propose_remedies(self, state, recovery):
        self.seen.append((state.step, dict(recovery.quarantined)))
        return Remedy("halve_steps", "our guard's own evidence", apply=self.halve, by="mine")

    def halve(self):
        before, self.steps = self.steps, self.steps // 2
        return {"before": before, "after": self.steps}


def test_a_guards_remedy_is_applied_by_the_core_and_recorded(run_guard):
    mine = SmallerSteps()  # driven as a third party would: stabguard.testing's run_guard fixture
    run = run_guard(mine, steps=8, builtins=("spike",), options={"spike": SPIKE},
                    extra=(LossFault(at={5, 6}, scale=50.0),))
    assert run.ok and mine.steps == 4 and [s for s, _ in mine.seen] == [6]
    (applied,) = run.events_of("remedy")
    assert applied["guard"] == "mine" and applied["step"] == 6 and run.verdicts[6] == "ROLLBACK"
    assert {k: applied["values"][k] for k in ("remedy", "before", "after", "evidence")} == {
        "remedy": "halve_steps", "before": 8, "after": 4, "evidence": "our guard's own evidence"}
    assert "after 1 rollbacks" in applied["values"]["trigger"], "the evidence: the STOP it healed"


# -- the policy alone ---------------------------------------------------------------------------------


def test_select_rows_keeps_the_rows_and_their_images_patches_only():
    from stabguard.replay import select_rows

    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # 4, 8 and 4 patches
    pixels = torch.arange(16).float().unsqueeze(1)
    batch = {"input_ids": torch.arange(15).view(3, 5), "labels": torch.ones(3, 5, dtype=torch.long),
             "image_grid_thw": grid, "pixel_values": pixels, "position_ids": torch.zeros(3, 3, 5)}
    kept = select_rows(batch, [0, 2], images=[1, 0, 2])  # row 2 holds the 2nd and 3rd images
    assert kept["input_ids"].tolist() == [list(range(5)), list(range(10, 15))]
    assert kept["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 2]]
    assert kept["pixel_values"].squeeze(1).tolist() == list(range(16)) and kept["position_ids"].shape == (3, 2, 5)
    alone = select_rows(batch, [1], images=[1, 2, 0])  # row 1: images 2 and 3 (patches 4..15)
    assert alone["pixel_values"].squeeze(1).tolist() == list(range(4, 16)) and alone["labels"].shape == (1, 5)


def diagnosis_of(batch: dict, alone: dict, reference=1.0, best=None):
    from stabguard.replay import Evidence, classify

    return classify(Evidence(batch=batch, alone=alone, reference=reference, best=best, factor=3.0))


def test_the_diagnosis_rule_on_replayed_losses():
    assert diagnosis_of({"a": 1.0, "b": 1.2}, {}).kind == "transient"
    culprit = diagnosis_of({"a": 9.0, "b": 8.0, "c": 1.0}, {"a": 9.0, "b": 1.1})
    assert (culprit.kind, culprit.samples) == ("concentrated", ["a"]), "b is high only beside a"
    assert diagnosis_of({"a": 9.0, "b": 8.0}, {"a": 9.0, "b": 8.5}).kind == "spread"
    assert diagnosis_of({"a": 9.0}, {"a": 9.0}).samples == ["a"], "a lone sample on weights just found normal"
    assert diagnosis_of({"a": float("nan"), "b": 1.0}, {"a": float("nan")}).samples == ["a"]
    assert diagnosis_of({"a": 4.0, "b": 4.2}, {}, reference=4.0, best=1.0).kind == "diverged"
    assert diagnosis_of({"a": 1.0}, {}, reference=None).kind == "unknown"


@given(st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 20), min_size=1),
       st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 20)))
@settings(deadline=None, max_examples=200)
def test_no_sample_is_named_without_its_own_replayed_evidence(batch, alone):
    found = diagnosis_of(batch, alone)
    for sample in found.samples:
        assert batch[sample] > 3.0 and alone.get(sample, 0.0) > 3.0
    assert found.kind != "concentrated" or len(found.samples) < len(batch) or len(batch) == 1


def test_rows_without_an_id_are_never_quarantined():
    from stabguard.replay import Diagnosis
    from stabguard.verdict import Verdict

    recovery = Recovery(RecoverySection(), EventLog())
    state = type("S", (), {"step": 3, "verdict": Verdict.rollback("x", "g")})()
    recovery.heal(state, Diagnosis("concentrated", ["batch row 0", "s1"], "e"), host=None, hook=None, context=None)
    assert list(recovery.quarantined) == ["s1"]


def test_the_recovery_state_round_trips_through_json():
    recovery = Recovery(RecoverySection(), EventLog())
    recovery.quarantined = {"s": {"step": 2, "evidence": "e"}}
    recovery.rejected = [[1, "transient"], [2, "concentrated"]]
    recovery.clip, recovery.applied = 0.25, [[2, "quarantine"]]
    recovery.cool, recovery.history = {"factor": 0.1, "until": None}, {1: [1e-3, 7.2], 2: [1e-3, None]}
    again = Recovery(RecoverySection(), EventLog())
    again.load_state_dict(json.loads(json.dumps(recovery.state_dict())))
    assert again.state_dict() == recovery.state_dict() and again.history == recovery.history


def test_recipe_recovery_errors_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        RecoverySection(remedies=["quarantine", "pray"], lr_cut=0.5)
    where = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert "unknown remedy 'pray'" in where["remedies"] and "lr_cut" in where
    assert math.isclose(RecoverySection().lr_cut, 10.0)


def test_resume_with_heal_after_a_stop_applies_the_next_remedy_and_goes_on(tmp_path, tiny_assets):
    spike = {"spike": SPIKE}
    stopped, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6}, scale=50.0), training={"max_steps": 9},
                             guards=spike, recovery={"budget": 0})
    assert "recovery budget spent (0 remedies" in stopped.stop_reason and stopped.trainer.stop_verdict.healable
    rejected = [e["values"]["skipped_samples"] for e in read_events(stopped.output_dir / "events.jsonl")
                if e["kind"] in ("rollback", "stop") and "skipped_samples" in e["values"]]
    healed, _ = run_guarded(tmp_path, tiny_assets, training={"max_steps": 9}, guards=spike, recovery={"budget": 0},
                            resume=True, heal=True)
    assert healed.ok and healed.global_step == 9
    (remedy,) = [e for e in remedies(healed.output_dir) if e["run"] == healed.run_id]
    assert remedy["step"] == 6 and remedy["values"]["remedy"] == "cool_down", "no quarantine without evidence"
    assert remedy["values"]["evidence"].startswith("asked with --heal after the STOP at step 6: spike:")
    assert remedy["values"]["after"] < remedy["values"]["before"] and rejected


def test_a_guards_remedy_that_raises_leaves_the_stop_and_names_the_guard():
    from stabguard.verdict import HookError, Verdict

    def broken():
        raise RuntimeError("no smaller batch")

    class Proposes:
        @staticmethod
        def propose_remedies(state, recovery, events):
            return [[Remedy("smaller_batch", "e", apply=broken, by="mine")]]

    recovery = Recovery(RecoverySection(), EventLog())
    from stabguard.replay import Diagnosis

    state = type("S", (), {"step": 9, "verdict": Verdict.stop("spikes", "spike", healable=True)})()
    assert recovery.admit(state) and state.verdict.action.name == "ROLLBACK"
    with pytest.raises(HookError, match="no smaller batch") as err:
        recovery.heal(state, Diagnosis("transient", [], "gone"), host=None, hook=Proposes, context=None)
    assert err.value.plugin == "mine" and not recovery.applied
