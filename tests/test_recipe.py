import json
from pathlib import Path

import pytest
from support import tiny_recipe, write_recipe

from stabguard.manager import Plugins
from stabguard.recipe import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


def errors_of(path, plugins=None) -> dict[str, str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, plugins or Plugins.for_recipe())
    return dict(info.value.errors)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    from stabguard.seams import fsdp2_accelerate_problem

    if "fsdp = true" in path.read_text() and (problem := fsdp2_accelerate_problem()):  # tox -e lowest
        assert errors_of(path) == {"training.fsdp": problem}, "refused for that reason alone"
        return
    recipe = load_recipe(path)  # with the plugins the recipe itself names
    assert recipe.training["output_dir"]
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each shipped recipe starts with a comment giving the command that runs it"
    assert f"stabguard run recipes/{path.name}" in path.read_text()


def test_every_error_is_reported_at_once_with_its_key(tmp_path):
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         training={"warmup_ratio": 0.1, "learning_rat": 1e-4},
                         guards={"nonfinite": {"max_consecutive": 0, "colour": "red"}, "nosuch": {}})
    recipe["lora"]["r"] = -1
    recipe["model"]["dtype"] = "fp8"
    recipe["surprise"] = {"x": 1}
    errors = errors_of(write_recipe(tmp_path / "r.toml", recipe))
    assert "warmup_steps = 0.1" in errors["training.warmup_ratio"]
    assert "learning_rate" in errors["training.learning_rat"]
    assert "lora.r" in errors and "model.dtype" in errors and "surprise" in errors
    assert "guards.nonfinite.max_consecutive" in errors
    assert errors["guards.nonfinite.colour"] == "unknown key; allowed: enabled, max_consecutive"
    assert "known guards:" in errors["guards.nosuch"] and "grad_norm" in errors["guards.nosuch"]


def test_missing_sections_and_output_dir(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[training]\nmax_steps = 1\n")
    errors = errors_of(path)
    assert {"model", "data", "training.output_dir"} <= set(errors)


def test_bad_toml_names_the_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[model]\nname_or_path = \n")
    errors = errors_of(path)
    assert "line 2" in errors["<toml>"]


def test_training_values_are_checked_by_transformers(tmp_path):
    # A rule across fields that only TrainingArguments itself knows: the best model needs evaluations.
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         training={"load_best_model_at_end": True})
    errors = errors_of(write_recipe(tmp_path / "r.toml", recipe))
    assert "load_best_model_at_end" in errors["training"]


def test_training_value_types_are_checked_all_at_once(tmp_path):
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         training={"max_steps": "twenty-four", "learning_rate": "fast", "bf16": "yes",
                                   "lr_scheduler_type": "zigzag"})
    errors = errors_of(write_recipe(tmp_path / "r.toml", recipe))
    assert errors["training.max_steps"] == 'expected an integer, got "twenty-four"'
    assert errors["training.learning_rate"] == 'expected a number, got "fast"'
    assert errors["training.bf16"] == 'expected true or false, got "yes"'
    assert errors["training.lr_scheduler_type"].startswith('expected one of "linear", "cosine"')


def test_an_integer_is_a_number_but_a_string_is_not_an_integer(tmp_path):
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         training={"learning_rate": 1, "warmup_steps": 0.1},
                         guards={"grad_norm": {"alert_above": 5}})
    loaded = load_recipe(write_recipe(tmp_path / "r.toml", recipe), Plugins.for_recipe())
    assert loaded.guards["grad_norm"].alert_above == 5.0
    recipe["guards"] = {"nonfinite": {"max_consecutive": "5"}}
    recipe["lora"]["r"] = "16"
    errors = errors_of(write_recipe(tmp_path / "r.toml", recipe))
    assert errors["guards.nonfinite.max_consecutive"] == 'Input should be a valid integer, got "5"'
    assert errors["lora.r"] == 'Input should be a valid integer, got "16"'


def test_guard_tables_get_their_options_and_defaults(tmp_path):
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         guards={"nonfinite": {"max_consecutive": 3}, "optim8bit": {"enabled": False}})
    loaded = load_recipe(write_recipe(tmp_path / "r.toml", recipe), Plugins.for_recipe())
    assert loaded.guards["nonfinite"].max_consecutive == 3
    assert loaded.guards["optim8bit"].enabled is False
    assert loaded.guards["grad_norm"].enabled is True  # absent tables: defaults, enabled


def test_unimportable_recipe_plugin_is_a_recipe_error(tmp_path):
    from stabguard.runner import prepare

    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out", plugins=["no_such_module_x"])
    with pytest.raises(RecipeError) as info:
        prepare(write_recipe(tmp_path / "r.toml", recipe))
    assert "no_such_module_x" in dict(info.value.errors)["plugins"]


def test_unknown_keys_suggest_the_close_name_and_workers_are_allowed(tmp_path):
    recipe = tiny_recipe({"model": "m", "train": "t.jsonl"}, tmp_path / "out",
                         training={"dataloader_num_workers": 2}, guards={"nonfinite": {"max_consecutve": 3}})
    recipe["lora"]["alhpa"] = 8
    recipe["data"]["synth"] = {"n": 4, "sede": 1}
    recipe["max_consecutive_skips"] = 0
    errors = errors_of(write_recipe(tmp_path / "r.toml", recipe))
    assert errors["guards.nonfinite.max_consecutve"].startswith("unknown key; did you mean max_consecutive?")
    assert "did you mean alpha?" in errors["lora.alhpa"]
    assert errors["data.synth.sede"] == "unknown key; did you mean seed? allowed: n, seed, size, val_fraction"
    assert "training.dataloader_num_workers" not in errors, "the data guards act in the main process"
    assert "positive integer" in errors["max_consecutive_skips"]


def test_fsdp2_with_an_accelerate_that_resumes_it_without_optimizer_state_is_refused(tmp_path, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.12.0" if name == "accelerate" else real(name))
    fsdp2 = {"fsdp": True, "fsdp_config": {"version": 2}}
    errors = errors_of(write_recipe(tmp_path / "r.toml", tiny_recipe({"model": "m", "train": "t.jsonl"},
                                                                     tmp_path / "out", training=fsdp2)))
    assert errors["training.fsdp"].startswith("FSDP2 needs accelerate >= 1.13 (installed 1.12.0)")
    assert "pip install 'accelerate>=1.13'" in errors["training.fsdp"]


def test_fsdp2_passes_through_and_the_unsupported_engines_are_refused_with_the_fix(tmp_path):
    from stabguard.seams import fsdp2_accelerate_problem

    if (problem := fsdp2_accelerate_problem()) is not None:
        pytest.skip(problem)
    fsdp2 = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    recipe = load_recipe(write_recipe(tmp_path / "ok.toml", tiny_recipe({"model": "m", "train": "t.jsonl"},
                                                                        tmp_path / "out", training=fsdp2)))
    assert recipe.training_arguments()["fsdp_config"] == {"version": 2, "reshard_after_forward": True}
    bad = {"deepspeed": str(tmp_path / "ds_zero2.json"), "fsdp": True, "fsdp_config": {"version": 1}}
    errors = errors_of(write_recipe(tmp_path / "bad.toml", tiny_recipe({"model": "m", "train": "t.jsonl"},
                                                                       tmp_path / "out", training=bad)))
    assert "ds_zero2.json: cannot read the DeepSpeed config" in errors["training.deepspeed"]
    assert "choose one" in errors["training.fsdp"]
    assert "version = 2" in errors["training.fsdp_config.version"]


@pytest.mark.parametrize("config, key, message", [
    ({"zero_optimization": {"stage": 0}}, "training.deepspeed.zero_optimization.stage", "use DDP"),
    ({"bf16": {"enabled": True}}, "training.deepspeed.zero_optimization.stage", "ZeRO stages 1, 2 and 3"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}},
     "training.deepspeed.zero_optimization.compute_grad_norm", "remove it"),
    ("[1, 2]", "training.deepspeed", "a JSON object, not list"),
    ("{zero", "training.deepspeed", "not a JSON DeepSpeed config"),
])
def test_a_deepspeed_config_that_stabguard_cannot_guard_is_named(tmp_path, config, key, message):
    if isinstance(config, str):  # a JSON file's text
        (tmp_path / "ds.json").write_text(config)
        config = str(tmp_path / "ds.json")
    errors = errors_of(write_recipe(tmp_path / "bad.toml", tiny_recipe({"model": "m", "train": "t.jsonl"},
                                                                       tmp_path / "out", training={"deepspeed": config})))
    assert message in errors[key]


def test_an_inline_zero_table_gets_auto_for_the_keys_deepspeed_requires(tmp_path):
    inline = {"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}
    recipe = load_recipe(write_recipe(tmp_path / "ok.toml", tiny_recipe(
        {"model": "m", "train": "t.jsonl"}, tmp_path / "out", training={"deepspeed": inline})))
    config = recipe.training_arguments()["deepspeed"]
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    assert config["bf16"] == {"enabled": "auto"}
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"] == {"stage": 3}, "the recipe's own win"


def test_a_zero_config_file_passes_through_to_the_trainer(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    recipe = load_recipe(write_recipe(tmp_path / "ok.toml", tiny_recipe(
        {"model": "m", "train": "t.jsonl"}, tmp_path / "out", training={"deepspeed": str(tmp_path / "ds.json")})))
    assert recipe.training_arguments()["deepspeed"] == str(tmp_path / "ds.json")


def test_a_renamed_training_argument_is_passed_under_the_installed_release_s_name(tmp_path):
    """activation_checkpointing (transformers 5.24) is gradient_checkpointing on the older supported
    releases; a recipe written either way runs on both."""
    from stabguard.recipe import installed_training_name, training_argument_names

    newer, older = {"activation_checkpointing", "gradient_checkpointing"}, {"gradient_checkpointing"}
    assert installed_training_name("activation_checkpointing", older) == "gradient_checkpointing"
    assert installed_training_name("gradient_checkpointing", older) == "gradient_checkpointing"
    assert installed_training_name("activation_checkpointing", newer) == "activation_checkpointing"
    assert installed_training_name("nosuch", older) == "nosuch"
    for written in ("activation_checkpointing", "gradient_checkpointing"):
        path = write_recipe(tmp_path / f"{written}.toml", tiny_recipe(
            {"model": tmp_path, "train": tmp_path / "t.jsonl"}, tmp_path / "out", training={written: True}))
        args = load_recipe(path, Plugins.for_recipe(autoload=False)).training_arguments()
        (passed,) = [k for k in args if k.endswith("_checkpointing")]
        assert passed in training_argument_names() and args[passed] is True
