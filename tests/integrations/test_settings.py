"""stabguard.integrations: the settings every framework integration reads, and the trainer class it builds.

No framework needed: the framework tests beside this file run each one's own command line.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from support import write_recipe

from stabguard.integrations import GuardSettings, guarded_trainer, settings_from_env


def test_a_recipe_s_guard_tables_are_used_and_explicit_keys_win(tmp_path):
    recipe = write_recipe(tmp_path / "guards.toml", {"plugins": ["stabguard.faults"], "max_consecutive_skips": 7,
                                                     "snapshots": {"every": 3, "ring": 4}, "recovery": {"budget": 1},
                                                     "guards": {"nonfinite": {"max_consecutive": 2}, "faults": {}}})
    settings = GuardSettings(recipe=recipe, snapshot_every=0)
    assert settings.plugins == ["stabguard.faults"] and settings.guards["nonfinite"] == {"max_consecutive": 2}
    kwargs = settings.step_kwargs()
    assert kwargs.pop("recovery").budget == 1, "the recipe's [recovery] table"
    assert kwargs == {"max_consecutive_skips": 7, "snapshot_every": 0, "snapshot_offload": False, "snapshot_ring": 4,
                      "snapshot_ring_every": 20}
    plugins = settings.make_plugins()
    assert plugins.guards["nonfinite"].instance.options.max_consecutive == 2 and plugins.guards["faults"].instance
    assert plugins.guards["mask"].instance is None, "named guards only, as in a recipe's tables"


def test_no_guards_named_gives_the_default_guards():
    plugins = GuardSettings().make_plugins()
    assert sorted(n for n, g in plugins.guards.items() if g.instance) == ["divergence", "grad_norm", "mask", "nonfinite",
                                                                           "spike"]


@pytest.mark.parametrize("given, key", [
    ({"guards": {"nosuch": {}}}, "stabguard.guards.nosuch: unknown guard; known guards:"),
    ({"guards": {"nonfinite": {"max_consecutve": 2}}}, "stabguard.guards.nonfinite.max_consecutve"),
    ({"plugins": ["no_such_module_x"]}, "stabguard.plugins: "),
    ({"snapshot_evry": 2}, "snapshot_evry"),
    ({"recovery": {"budgt": 2}}, "stabguard.recovery.budgt: Extra inputs are not permitted"),
])
def test_bad_settings_are_refused_naming_the_key(given, key):
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        GuardSettings.model_validate(given)


def test_settings_from_the_environment(tmp_path):
    env = {"STABGUARD_GUARDS": '{"nonfinite": {}, "faults": {"nan_grad_at": [2]}}',
           "STABGUARD_PLUGINS": "stabguard.faults"}
    assert set(settings_from_env(env).guards) == {"nonfinite", "faults"}
    assert settings_from_env({}).guards is None
    with pytest.raises(ValueError, match="STABGUARD_GUARDS: not JSON"):
        settings_from_env({"STABGUARD_GUARDS": "{nonfinite}"})


def test_a_stop_inside_a_framework_s_trainer_ends_its_command_with_exit_3(tmp_path, tiny_assets):
    """A framework's CLI would exit 0 after a STOP, as if the run had trained; the guarded class exits 3."""
    trl = pytest.importorskip("trl")
    from test_trl import sft_trainer_kwargs

    settings = GuardSettings(plugins=["stabguard.faults"], guards={"nonfinite": {"max_consecutive": 1},
                                                                   "faults": {"nan_grad_at": [2]}})
    asked = []
    cls = guarded_trainer(trl.SFTTrainer, settings, processor=lambda trainer: asked.append(trainer))
    trainer = cls(**sft_trainer_kwargs(tmp_path, tiny_assets))
    assert asked == [trainer], "the guards asked the framework's processor hook"
    with pytest.raises(SystemExit) as stopped:
        trainer.train()
    assert stopped.value.code == 3 and trainer.stop_reason.startswith("step 2")
    assert trainer.state.global_step == 2 and all(
        torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)


def test_the_llamafactory_command_says_how_to_get_llamafactory_when_it_is_missing(tmp_path):
    import importlib.util

    from click.testing import CliRunner

    from stabguard.cli import main

    if importlib.util.find_spec("llamafactory") is not None:
        pytest.skip("LLaMA-Factory is installed here: tests/integrations/test_llamafactory.py runs it")
    (tmp_path / "config.yaml").write_text("stage: sft\n")
    result = CliRunner().invoke(main, ["llamafactory", "train", str(tmp_path / "config.yaml")])
    assert result.exit_code == 1 and "LLaMA-Factory is not installed here: pip install llamafactory" in result.output


def test_probe_mode_runs_the_framework_s_first_step_vetoed_reports_and_exits(tmp_path, tiny_assets, capsys):
    """``probe: true``: the framework's trainer as built for training; its first step runs with the update
    vetoed, in a scratch folder, the probe's report is printed and the command exits (1: an error found).
    A NaN gradient makes the report's error; with none it exits 0. Nothing lands in the run's folder."""
    trl = pytest.importorskip("trl")
    from test_trl import sft_trainer_kwargs

    def probed(guards):
        settings = GuardSettings(plugins=["stabguard.faults"], guards=guards, probe=True)
        kwargs = sft_trainer_kwargs(tmp_path, tiny_assets)
        trainer = guarded_trainer(trl.SFTTrainer, settings)(**kwargs)
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        with pytest.raises(SystemExit) as ended:
            trainer.train()
        assert trainer.state.global_step == 1 and all(
            torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters() if p.requires_grad), "no update"
        return ended.value.code, capsys.readouterr().out, kwargs["args"].output_dir

    code, said, scratch = probed({"nonfinite": {}, "faults": {"nan_grad_at": [1]}})
    assert code == 1 and "SFTTrainer (probe of the framework's own run)" in said
    assert "ERROR  probe: gradients: 1 trainable tensors got NaN/Inf gradients" in said, said
    assert "language_model.layers.0.self_attn.q_proj (lora_B)" in said, "the tensor the NaN was put into"
    assert "stabguard-probe-" in scratch and not list((tmp_path / "out").glob("checkpoint-*"))
    code, said, _ = probed({"nonfinite": {}})
    assert code == 0 and "ok  probe: gradients: all " in said and "0 error(s)" in said, said
    # NaN pixels in a framework's batch (its samples carry no ids): named as such, not "no image"
    code, said, _ = probed({"nonfinite": {}, "faults": {"nan_pixels_at": [1]}})
    assert code == 1 and "ERROR  probe: pixels: pixel values are non-finite" in said, said
