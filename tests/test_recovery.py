"""Recovery (stabguard/recovery.py): each trouble made to happen on the tiny model, and the run healed."""

import json
import math

import pytest
import torch

from stabguard import IGNORE_INDEX, Remedy, hookimpl
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


def test_a_sample_that_spikes_every_time_is_quarantined_never_trained_on_again_and_the_run_finishes(
        tmp_path, tiny_assets):
    bad, seen = spiking(tiny_assets, 5), Samples()
    faults = {"faults": {"spike_samples": ["train.jsonl:5"]}}
    result, _ = run_guarded(tmp_path / "healed", tiny_assets, seen, faults_plugin, training={"max_steps": 30},
                            guards={"spike": SPIKE, **faults})
    assert result.ok, result.stop_reason
    (quarantine,) = remedies(result.output_dir)
    assert quarantine["values"]["remedy"] == "quarantine" and quarantine["values"]["samples"] == [bad]
    rejected = [s for s, (verdict, samples) in seen.steps.items() if bad in samples and verdict != "PROCEED"]
    assert quarantine["step"] == rejected[1], "quarantined at its second rejected step"
    later = {s: v for s, v in seen.steps.items() if s > quarantine["step"]}
    assert all(bad not in samples for _, samples in later.values()), "never trained on again"
    assert {verdict for verdict, _ in later.values()} <= {"PROCEED", "SKIP"}, "no spike after the quarantine"
    events = read_events(result.output_dir / "events.jsonl")
    assert any(e["values"].get("masked") == [bad] for e in events), "it still arrived, and was masked"
    assert [e for e in events if "quarantined" in e["values"]][-1]["values"]["quarantined"][bad]["rejected_steps"] \
        == rejected[:2]

    stopped, _ = run_guarded(tmp_path / "today", tiny_assets, faults_plugin, training={"max_steps": 30},
                             guards={"spike": SPIKE, **faults},
                             recovery={"enabled": False})
    assert not stopped.ok and "after 1 rollbacks" in stopped.stop_reason, "without recovery the same run stops"


def test_a_healthy_run_is_untouched(tmp_path, tiny_assets):
    on, off = StepProbe(), StepProbe()
    first, _ = run_guarded(tmp_path / "on", tiny_assets, on, training={"max_steps": 6}, guards={"spike": SPIKE})
    second, _ = run_guarded(tmp_path / "off", tiny_assets, off, training={"max_steps": 6}, guards={"spike": SPIKE},
                            recovery={"enabled": False})
    assert first.ok and second.ok and not remedies(first.output_dir)
    assert on.losses == off.losses and on.norms == off.norms and on.lrs == off.lrs  # bit for bit


def test_healable_stops_take_the_remedies_in_order_then_the_spent_budget_stops_with_the_verified_state(
        tmp_path, tiny_assets):
    probe = StepProbe()
    result, _ = run_guarded(tmp_path, tiny_assets, LossFault(at={5, 6, 7, 8}, scale=50.0), probe,
                            training={"max_steps": 12}, guards={"spike": SPIKE},
                            recovery={"remedies": ["cool_down", "tighten_clip"], "budget": 2, "cool_steps": 0})
    applied = remedies(result.output_dir)
    assert [(e["step"], e["values"]["remedy"]) for e in applied] == [(6, "cool_down"), (7, "tighten_clip")]
    cool, clip = (e["values"] for e in applied)
    assert cool["after"] == pytest.approx(cool["before"] * 0.5) and (clip["before"], clip["after"]) == (1.0, 0.5)
    assert probe.verdicts[5] == probe.verdicts[6] == probe.verdicts[7] == "ROLLBACK"
    assert probe.lrs[7] == pytest.approx(probe.lrs[6] * 0.5), "the cooled rate is in force at the next step"
    assert result.stop_reason.startswith("step 8: spike:")
    assert "recovery budget spent (2 remedies" in result.stop_reason
    saved = json.loads((result.output_dir / "checkpoint-7" / "stabguard_state.json").read_text())
    assert saved["verified_step"] == 3
    assert saved["recovery"]["clip"] == 0.5 and saved["recovery"]["cool"]["factor"] == 0.5
    assert result.trainer.lr_scheduler.base_lrs == [pytest.approx(0.5e-3)] * 2, "the scheduler's shape, scaled"


def test_a_cool_down_survives_a_resume_mid_way(tmp_path, tiny_assets):
    cooling = {"remedies": ["cool_down"], "cool_steps": 4}
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


def test_mask_clears_the_labels_and_the_image_pixels_of_quarantined_rows_only():
    recovery = Recovery(RecoverySection(), EventLog())
    recovery.quarantined["b"] = {"step": 3}
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2]])  # 4, 8 and 4 patches
    batch = {"labels": torch.ones(3, 5, dtype=torch.long), "image_grid_thw": grid, "pixel_values": torch.ones(16, 3)}
    samples = [{"n_images": 1}, {"n_images": 2}, {"n_images": 0}]  # b has the 2nd and 3rd images
    assert recovery.mask(["a", "b", "c"], batch, samples) == ["b"]
    assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][[0, 2]] == 1).all()
    assert (batch["pixel_values"][:4] == 1).all() and (batch["pixel_values"][4:] == 0).all()


def test_rows_without_an_id_are_never_quarantined():
    recovery = Recovery(RecoverySection(repeat=2), EventLog())
    state = type("S", (), {"step": 1, "verdict": None})()
    from stabguard.verdict import Verdict

    for step in (1, 2):
        state.step, state.verdict = step, Verdict.skip("x", "g")
        recovery.heal(state, ["batch row 0", "s1"], host=None, hook=None)
    assert list(recovery.quarantined) == ["s1"]


def test_the_recovery_state_round_trips_through_json():
    recovery = Recovery(RecoverySection(), EventLog())
    recovery.quarantined = {"s": {"step": 2, "evidence": "e", "rejected_steps": [1, 2]}}
    recovery.rejected, recovery.clip, recovery.applied = {"s": [1, 2]}, 0.25, [[2, "quarantine"]]
    recovery.cool = {"factor": 0.5, "until": 9}
    again = Recovery(RecoverySection(), EventLog())
    again.load_state_dict(json.loads(json.dumps(recovery.state_dict())))
    assert again.state_dict() == recovery.state_dict()


def test_recipe_recovery_errors_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        RecoverySection(remedies=["quarantine", "pray"], cool_factor=1.5)
    where = {e["loc"][0]: e["msg"] for e in err.value.errors()}
    assert "unknown remedy 'pray'" in where["remedies"] and "cool_factor" in where
    assert math.isclose(RecoverySection().cool_factor, 0.5)


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
    assert remedy["step"] == 6 and remedy["values"]["remedy"] == "quarantine"
    assert remedy["values"]["evidence"].startswith("asked with --heal after the STOP at step 6: spike:")
    assert len(remedy["values"]["samples"]) == 2 and rejected


def test_a_guards_remedy_that_raises_leaves_the_stop_and_names_the_guard():
    from stabguard.verdict import HookError, Verdict

    def broken():
        raise RuntimeError("no smaller batch")

    class Proposes:
        @staticmethod
        def propose_remedies(state, recovery, events):
            return [[Remedy("smaller_batch", "e", apply=broken, by="mine")]]

    recovery = Recovery(RecoverySection(), EventLog())
    state = type("S", (), {"step": 9, "verdict": Verdict.stop("spikes", "spike", healable=True)})()
    with pytest.raises(HookError, match="no smaller batch") as err:
        recovery.heal(state, ["s1"], host=None, hook=Proposes)
    assert err.value.plugin == "mine" and state.verdict.action.name == "STOP" and not recovery.applied
