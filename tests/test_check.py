"""``stabguard check``: each failure mode on real files, the tiny recipe passing, the 32B arithmetic."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import tiny_recipe, write_recipe

from stabguard import GuardOptions, hookimpl
from stabguard.check import model_file_problems, preflight
from stabguard.cli.check import command
from stabguard.manager import Plugins

HUB_32B = "Qwen/Qwen3-VL-32B-Instruct"


def check(tmp_path, assets, *args, training=None, **top):
    recipe = tiny_recipe(assets, tmp_path / "out", training=training)
    for section, values in top.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    result = CliRunner().invoke(command, [str(write_recipe(tmp_path / "recipe.toml", recipe)), *args])
    return result.exit_code, result.output


def as_json(tmp_path, assets, *args, **kwargs) -> dict:
    code, output = check(tmp_path, assets, "--json", *args, **kwargs)
    return json.loads(output[output.index("{"):])  # stderr notes (a tiny model being built) come first


def copy_model(tmp_path, assets):
    return shutil.copytree(assets["model"], tmp_path / "model")


def test_the_tiny_recipe_passes_and_shows_table_masks_memory(tmp_path, tiny_assets):
    code, output = check(tmp_path, tiny_assets)
    assert code == 0, output
    assert "what the loss sees" in output and "<|im_end|>" in output
    assert "language model" in output and "= " in output and "GiB" in output
    report = as_json(tmp_path, tiny_assets)
    assert report["ok"] and report["parameters"]["vision"]["trainable"] == 0
    assert report["parameters"]["all"]["trainable"] == report["parameters"]["all"]["lora"] > 0
    assert {f["check"] for f in report["findings"]} >= {"recipe", "model files", "data", "masks", "memory"}


def test_progress_follows_each_data_file_to_its_end(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, tmp_path / "out"))
    last = {}
    preflight(recipe, progress=lambda what, done, total: last.update({what: (done, total)}))
    assert set(last) == {"train rows checked", "train rows scanned for images", "train images decoded",
                         "train rows loaded"}  # the tiny recipe has no val file
    assert all(done == total > 0 for done, total in last.values())


def test_a_missing_shard_is_named(tmp_path, tiny_assets):
    model = copy_model(tmp_path, tiny_assets)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.visual.pos_embed.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    code, output = check(tmp_path, {**tiny_assets, "model": model})
    assert code == 1
    assert "model-00002-of-00002.safetensors: missing or empty (named in model.safetensors.index.json)" in output
    assert "model-00001" not in output.split("model-00002")[0]  # the shard that is there is not reported


def test_a_missing_chat_template_is_an_error(tmp_path, tiny_assets):
    model = copy_model(tmp_path, tiny_assets)
    (model / "chat_template.jinja").unlink()
    problems, _ = model_file_problems(model)
    assert len(problems) == 1 and problems[0].startswith("chat_template.jinja: missing")
    code, output = check(tmp_path, {**tiny_assets, "model": model})
    assert code == 1 and "chat_template.jinja: missing" in output


def test_a_corrupt_image_is_named_with_its_row(tmp_path, tiny_assets):
    data = shutil.copytree(tiny_assets["train"].parent, tmp_path / "data")
    row = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    image = next(item["image"] for m in row["messages"] if isinstance(m["content"], list)
                 for item in m["content"] if item["type"] == "image")
    (data / image).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, output = check(tmp_path, {**tiny_assets, "train": data / "train.jsonl"})
    assert code == 1 and f"image {image}" in output and "train.jsonl:1" in output and "cannot be decoded" in output


def test_missing_data_says_the_command_that_makes_it(tmp_path, tiny_assets):
    missing = tmp_path / "data" / "pcb" / "train.jsonl"
    code, output = check(tmp_path, {**tiny_assets, "train": missing}, data={"val": str(missing.with_name("val.jsonl"))})
    assert code == 1 and "train.jsonl: file not found" in output and "val.jsonl: file not found" in output
    assert f"make it first: stabguard data synth-pcb --out {missing.parent} --n 2000" in output


def test_32b_from_the_builtin_sizes_bad_lr_and_the_weights_arithmetic(tmp_path, tiny_assets):
    report = as_json(tmp_path, tiny_assets, training={"learning_rate": 5e-4, "activation_checkpointing": True},
                     model={"name_or_path": HUB_32B}, quantization={"load_in_4bit": True}, lora={"r": 16, "alpha": 32})
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["model files"]["level"] == "warn" and "cannot be checked offline" in by_check["model files"]["message"]
    assert by_check["learning rate"]["level"] == "error" and "0.0005" in by_check["learning rate"]["message"]
    base = report["parameters"]["all"]["total"] - report["parameters"]["all"]["lora"]
    assert base == pytest.approx(33.36e9, rel=0.002)  # the published Qwen3-VL-32B count
    assert report["parameters"]["all"]["lora"] == pytest.approx(134.2e6, rel=0.005)  # qwen3vl.md: r=16 on 7 projections
    weights = sum(line["gib"] for line in report["memory"]["lines"] if "weights" in line["what"])
    assert 22 <= weights <= 23.5  # qwen3vl.md: NF4 + fp32-upcast rest ~22-23 GiB before activations
    (snapshot,) = [line for line in report["memory"]["lines"] if line["what"].startswith("verified snapshot")]
    assert snapshot["gib"] == pytest.approx(3 * 134.2e6 * (4 + 2) / 2**30, abs=0.01)  # 1 + ring 2: fp32 + 8-bit Adam


def test_an_offloaded_snapshot_costs_no_gpu_memory(tmp_path, tiny_assets):
    report = as_json(tmp_path, tiny_assets, snapshots={"offload": True})
    (snapshot,) = [line for line in report["memory"]["lines"] if line["what"].startswith("verified snapshot")]
    assert snapshot["arithmetic"] == "0 B on the GPU" and "CPU memory" in snapshot["what"]
    on_gpu = as_json(tmp_path, tiny_assets, snapshots={"offload": False})
    (kept,) = [line for line in on_gpu["memory"]["lines"] if line["what"].startswith("verified snapshot")]
    assert kept["arithmetic"] != "0 B on the GPU", "without offload the copy is counted on the GPU"


def test_too_little_memory_fails_with_the_arithmetic(tmp_path, tiny_assets):
    code, output = check(tmp_path, tiny_assets, "--gpu-mem", "0.5")
    assert code == 1 and "does not fit" in output and "against --gpu-mem 0.5 GiB" in output
    assert "CUDA context and workspace" in output and "logits and loss" in output


def test_the_source_notes_model_class_and_an_invalid_recipe(tmp_path, tiny_assets):
    code, output = check(tmp_path, tiny_assets, model={"model_class": "AutoModelForVision2Seq"})
    assert code == 1 and "removed in transformers 5" in output and "AutoModelForImageTextToText" in output
    code, output = check(tmp_path, tiny_assets, training={"warmup_ratio": 0.1})
    assert code == 2 and "training.warmup_ratio" in output


class FrozenCount:
    """A third-party guard with its own preflight: findings under its name, with values."""

    @hookimpl
    def preflight(self, model, optimizer, report):
        frozen = sum(not p.requires_grad for p in model.parameters())
        report("warn", f"{frozen} frozen tensors", frozen=frozen)
        report("info", "a second heading", check="frozen tensors", details=["one", "two"])


@hookimpl
def register_guards(register):
    register("frozen_count", GuardOptions, lambda options: FrozenCount())


def test_a_guards_preflight_findings_reach_the_check_and_the_core_imports_no_guard(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe()
    plugins.register(sys.modules[__name__], name="frozen-count-plugin")
    plugins.collect_guards()
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, tmp_path / "out"))
    report = preflight(recipe, plugins=plugins)
    mine = [f for f in report.findings if f.guard == "frozen_count"]
    assert [(f.check, f.level) for f in mine] == [("frozen_count", "warn"), ("frozen tensors", "info")]
    assert mine[0].values["frozen"] > 0 and mine[1].details == ["one", "two"]
    assert report.parameters["vision"]["trainable"] == 0, "vision_freeze's preflight fills the parameter table"
    source = (Path(__file__).parent.parent / "stabguard" / "check.py").read_text()
    assert "stabguard.plugins" not in source, "stabguard check must learn about guards through their hooks"
