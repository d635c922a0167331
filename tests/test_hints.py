"""stabguard/hints.py: the note's checklist as hints tied to a stopped run's own evidence."""

from __future__ import annotations

import json

from click.testing import CliRunner
from support import tiny_recipe, write_recipe
from support_faults import GradFault, guard_plugins, run_guarded
from support_runs import write_events

import stabguard.runner
from stabguard import Verdict, hookimpl
from stabguard.cli.run import command
from stabguard.diagnosis import num
from stabguard.hints import hints_for

NAN_EVERY_STEP = dict(training={"max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                      guards={"nonfinite": {"max_consecutive": 2}})


def by_topic(hints: list[str]) -> dict[str, str]:
    return {hint.split(":")[0]: hint for hint in hints}


def test_a_run_nan_from_step_1_points_at_files_and_data_first(tmp_path, tiny_assets, monkeypatch):
    """Through ``stabguard run``, which prints the hints on STOP."""
    real_run, fault = stabguard.runner.run, GradFault(range(1, 20), value=float("nan"))
    monkeypatch.setattr(stabguard.runner, "run", lambda recipe, resume=None, heal=False: real_run(
        recipe, resume=resume, plugins=guard_plugins(fault)))
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, tmp_path / "out", **NAN_EVERY_STEP))
    result = CliRunner().invoke(command, [str(recipe)])
    assert result.exit_code == 3
    printed = [line.removeprefix("stabguard: try: ") for line in result.output.splitlines()
               if line.startswith("stabguard: try: ")]
    hints = hints_for(tmp_path / "out", next(line.removeprefix("stabguard: STOPPED at ") for line in
                                              result.output.splitlines() if line.startswith("stabguard: STOPPED at ")))
    assert printed == hints
    assert [h.split(":")[0] for h in hints] == ["where", "model files", "data", "learning rate", "clipping", "batch size"]
    topic = by_topic(hints)
    assert "NaN/Inf gradients start in language_model.layers.0.self_attn.q_proj" in topic["where"]
    assert "non-finite already at step 1, before any update" in topic["model files"]
    assert "step 1 was the first non-finite step (non-finite gradients" in topic["data"]
    assert "learning_rate = 0.001" in topic["learning rate"] and "learning_rate = 0.0005" in topic["learning rate"]
    assert "max_grad_norm = 1 " in topic["clipping"] and "cannot repair the non-finite gradient of step 1" in topic["clipping"]
    assert "per_device_train_batch_size = 1, gradient_accumulation_steps = 4" in topic["batch size"]


class StopAbove:
    """A user's guard: stop when the pre-clip grad norm passes a line."""

    @hookimpl
    def pre_step(self, state):
        if state.host()["grad_norm"] > 100:
            return Verdict.stop(f"grad norm {state.host()['grad_norm']:.3g} above 100", "stop-above")


def test_an_exploding_run_points_at_lr_and_clipping_with_its_peak(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, GradFault([3, 4], scale=1e6), StopAbove(),
                            training={"max_steps": 4, "max_grad_norm": 0.3})
    assert not result.ok and result.stop_reason.startswith("step 3")
    history = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    peak = max(e["grad_norm"] for e in history if "grad_norm" in e)
    hints = hints_for(result.output_dir, result.stop_reason)
    assert [h.split(":")[0] for h in hints] == ["where", "data", "learning rate", "clipping", "batch size", "model files"]
    topic = by_topic(hints)
    assert "came from lora_B of language_model.layers.0.self_attn.q_proj alone: a single bad sample?" in topic["where"]
    assert f"peaked at {num(peak)} at step 3" in topic["clipping"] and "max_grad_norm = 0.1" in topic["clipping"]
    assert "no sample was flagged before step 3" in topic["data"]
    assert "already 1 per device" in topic["batch size"]


def test_flagged_samples_are_named(tmp_path):
    write_events(tmp_path, [("mask", "info", 1, "what the loss sees, sample train.jsonl:2: ok", {"sample": "train.jsonl:2"}),
                            ("mask", "finding", 1, "sample train.jsonl:7: no supervised token", {"sample": "train.jsonl:7"}),
                            ("nonfinite", "stop", 3, "run stopped at step 3: nonfinite: ...", {})])
    topic = by_topic(hints_for(tmp_path, "step 3: nonfinite: 3 consecutive non-finite steps"))
    assert "sample train.jsonl:7: no supervised token" in topic["data"] and "train.jsonl:2" not in topic["data"]
