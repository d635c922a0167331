"""plugins/precision.py: fp16 on a bf16 checkpoint, risky stacks, the CPU summary, the model class."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from support import tiny_recipe, write_recipe
from transformers import Qwen3VLModel

from stabguard import EventLog, GuardError
from stabguard.manager import Plugins
from stabguard.plugins import optim8bit
from stabguard.plugins.precision import Options, PrecisionGuard, saved_dtype
from stabguard.recipe import LoraSection, ModelSection, QuantizationSection
from stabguard.runner import run


def checkpoint(tmp_path, **config):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3VLForConditionalGeneration"], **config}))
    return folder


def recipe(path, *, training=None, dtype="auto", four_bit=False, compute="bfloat16", model_class=None, optim=True,
           paged=False):
    model = ModelSection(name_or_path=str(path), dtype=dtype, **({"model_class": model_class} if model_class else {}))
    return SimpleNamespace(model=model, training={"output_dir": "out", **(training or {})}, lora=LoraSection(),
                           quantization=QuantizationSection(load_in_4bit=four_bit, compute_dtype=compute),
                           guards={"optim8bit": optim8bit.Options(enabled=optim, paged=paged)})


def configure(rcp, **options):
    events = EventLog()
    PrecisionGuard(Options(**options)).configure(recipe=rcp, events=events)
    return events


def test_fp16_on_a_bf16_checkpoint_is_refused_with_the_fix(tmp_path):
    rcp = recipe(checkpoint(tmp_path, dtype="bfloat16"), training={"fp16": True})
    with pytest.raises(GuardError) as err:
        configure(rcp)
    message = str(err.value)
    assert "training.fp16 = true on a checkpoint saved in bfloat16" in message and "config.json" in message
    assert "Fix: bf16 = true, fp16 = false" in message


@pytest.mark.parametrize("where", [{"dtype": "float16"}, {"four_bit": True, "compute": "float16"}])
def test_every_fp16_request_is_named_and_warn_policy_alerts(tmp_path, where):
    events = configure(recipe(checkpoint(tmp_path, torch_dtype="bfloat16"), optim=False, **where), fp16_on_bf16="warn")
    [alert] = events.of_kind("alert")
    assert ('model.dtype = "float16"' if "dtype" in where else 'quantization.compute_dtype = "float16"') in alert["message"]


def test_a_float32_or_bf16_run_passes(tmp_path):
    folder = checkpoint(tmp_path, dtype="bfloat16")
    for training in ({}, {"bf16": True}):
        assert configure(recipe(folder, training=training)).of_kind("alert") == []
    assert saved_dtype({"text_config": {"dtype": "bfloat16"}}) == "bfloat16"


def test_fp16_with_4bit_and_the_8bit_optimizer_is_flagged_as_risky(tmp_path):
    folder = checkpoint(tmp_path, dtype="float32")
    risky = configure(recipe(folder, training={"fp16": True}, four_bit=True)).of_kind("alert")
    assert len(risky) == 1 and "4-bit weights + the 8-bit optimizer" in risky[0]["message"]
    assert configure(recipe(folder, training={"fp16": True}, four_bit=True, optim=False)).of_kind("alert") == []
    with pytest.raises(GuardError, match="risky precision stack"):
        configure(recipe(folder, training={"fp16": True}, four_bit=True), risky="error")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU summary")
def test_on_cpu_it_says_what_really_runs(tmp_path):
    events = configure(recipe(checkpoint(tmp_path, dtype="float32"), training={"fp16": True}))
    summary = next(e["message"] for e in events.of_kind("info") if e["message"].startswith("on CPU"))
    assert "weights float32 (dtype auto loads float32 on CPU)" in summary
    assert "fp16 = true has no effect on CPU" in summary and "AdamW8bit runs on the CPU" in summary
    assert "paged" not in summary, "nothing is said about a setting the recipe does not make"
    (tmp_path / "p").mkdir()
    paged = configure(recipe(checkpoint(tmp_path / "p", dtype="float32"), paged=True))
    assert any("(paged = true is ignored there)" in e["message"] for e in paged.of_kind("info"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU summary")
def test_a_gpu_recipe_checked_without_a_gpu_gets_no_cpu_summary(tmp_path):
    events = configure(recipe(checkpoint(tmp_path, dtype="bfloat16"), training={"bf16": True}, four_bit=True))
    assert not [e for e in events.of_kind("info") if e["message"].startswith("on CPU")]


def test_auto_model_for_vision2seq_gets_the_transformers_5_message(tmp_path):
    rcp = recipe(checkpoint(tmp_path, dtype="bfloat16"), model_class="AutoModelForVision2Seq")
    with pytest.raises(GuardError) as err:
        configure(rcp)
    assert "removed in transformers 5" in str(err.value) and "Qwen3VLForConditionalGeneration" in str(err.value)


def test_loaded_class_is_checked_against_config_architectures(tiny_assets):
    rcp = recipe(tiny_assets["model"])
    base = Qwen3VLModel.from_pretrained(tiny_assets["model"])  # loads, but has no lm_head: it cannot be trained
    with pytest.raises(GuardError) as err:
        PrecisionGuard(Options()).setup_model(model=base, recipe=rcp, events=EventLog())
    assert "loaded Qwen3VLModel" in str(err.value) and "'Qwen3VLForConditionalGeneration'" in str(err.value)


def test_a_run_with_fp16_on_a_bf16_checkpoint_is_refused_before_loading(tmp_path, tiny_assets):
    model = shutil.copytree(tiny_assets["model"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    recipe_dict = tiny_recipe({**tiny_assets, "model": model}, tmp_path / "out", training={"fp16": True})
    with pytest.raises(GuardError, match="training.fp16 = true on a checkpoint saved in bfloat16"):
        run(write_recipe(tmp_path / "recipe.toml", recipe_dict), plugins=Plugins.for_recipe())
