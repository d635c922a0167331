"""stabguard/engine_check.py and the engine part of ``stabguard check``: each known engine failure is
flagged before step 1 with its fix; memory per rank under FSDP2."""

from __future__ import annotations

import json

from click.testing import CliRunner
from support import tiny_recipe, write_recipe

from stabguard.cli.check import command
from stabguard.engine_check import findings, modality_mix
from stabguard.recipe import QuantizationSection

FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2}}


class Optim8:
    enabled, paged = True, True


def messages(rows) -> list[str]:
    return [m for _, m in rows]


def test_fsdp2_qlora_pitfalls_each_with_its_fix():
    q = QuantizationSection(load_in_4bit=True)
    found = findings(FSDP2, q, {"optim8bit": Optim8()}, None)
    assert any("uint8" in m and 'quant_storage = "bfloat16"' in m for m in messages(found))
    assert any("cpu_ram_efficient_loading = true" in m for m in messages(found))
    assert any("paged" in m and "paged = false" in m for m in messages(found))
    fixed = {"fsdp": True, "fsdp_config": {"version": 2, "cpu_ram_efficient_loading": True}}
    assert findings(fixed, QuantizationSection(load_in_4bit=True, quant_storage="bfloat16"), {}, None) == []
    assert findings({}, q, {"optim8bit": Optim8()}, None) == [], "single device / DDP: none of these apply"


class Guard:
    def __init__(self, enabled):
        self.enabled = enabled


def test_deepspeed_pitfalls_each_with_its_fix(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                        "offload_optimizer": {"device": "nvme"}},
                                  "bf16": {"enabled": True, "check_grad_overflow": False}}))
    found = messages(findings({"deepspeed": str(config)}, QuantizationSection(),
                              {"nonfinite": Guard(False), "optim8bit": Guard(True)}, None))
    assert any("optim8bit under DeepSpeed" in m and "enabled = false" in m for m in found)
    assert any("overlap_comm = false" in m for m in found)
    assert any("guards.nonfinite is off" in m and "enabled = true" in m for m in found)
    assert any("nvme" in m and "every = 0" in m for m in found)
    clean = {"deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}}
    assert findings(clean, QuantizationSection(), {"nonfinite": Guard(True)}, None) == [], (
        "ZeRO-3 in bf16 with the nonfinite guard on: nothing to flag")


def test_mixed_modality_under_sharded_engines_offers_the_fix(tmp_path, tiny_assets):
    data = tmp_path / "mixed.jsonl"
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    data.write_text(tiny_assets["train"].read_text() + json.dumps(text_only) + "\n")
    assert modality_mix(data, 100)[1] == 1
    (hang,) = [m for m in messages(findings(FSDP2, QuantizationSection(), {}, str(data))) if "hangs" in m]
    assert "same on every rank" in hang and "data.text_only_image = true" in hang
    fixed = findings(FSDP2, QuantizationSection(), {}, str(data), text_only_image=True)
    assert [level for level, m in fixed if "text-only" in m] == ["info"], "with the fix on: said, not flagged"
    zero3 = {"deepspeed": {"zero_optimization": {"stage": 3}}}
    assert any("hangs" in m for m in messages(findings(zero3, QuantizationSection(), {}, str(data))))
    assert not any("hangs" in m for m in messages(findings({}, QuantizationSection(), {}, str(data))))
    assert not any("hangs" in m for m in messages(findings(FSDP2, QuantizationSection(), {}, str(tiny_assets["train"]))))


def run_check(tmp_path, assets, *args, training=None, quantization=None):
    recipe = tiny_recipe(assets, tmp_path / "out", training=training)
    if quantization:
        recipe["quantization"] = quantization
    result = CliRunner().invoke(command, [str(write_recipe(tmp_path / "r.toml", recipe)), "--json", *args])
    return result.exit_code, json.loads(result.output[result.output.index("{"):])


def test_check_flags_fsdp_uint8_storage_and_shards_memory_per_rank(tmp_path, tiny_assets, monkeypatch):
    # what the engine check flags, on any accelerate (tox -e lowest's 1.11 refuses FSDP2 in the recipe itself:
    # tests/test_recipe.py)
    monkeypatch.setattr("stabguard.seams.fsdp2_accelerate_problem", lambda: None)
    code, report = run_check(tmp_path, tiny_assets, training=FSDP2, quantization={"load_in_4bit": True})
    assert code == 1
    assert any(f["check"] == "engine" and "uint8" in f["message"] for f in report["findings"])
    _, one = run_check(tmp_path, tiny_assets, training=FSDP2)
    _, four = run_check(tmp_path, tiny_assets, "--world-size", "4", training=FSDP2)
    weights = lambda r: next(x for x in r["memory"]["lines"] if x["what"].startswith("weights"))  # noqa: E731
    assert four["memory"]["sharded"] and not one["memory"]["sharded"]
    assert weights(four)["arithmetic"].endswith(") / 4") and "/ 4" not in weights(one)["arithmetic"], (
        "the tiny model's GiB round to 0: the written arithmetic says what was split")


def test_check_on_a_deepspeed_recipe_flags_its_pitfalls(tmp_path, tiny_assets):
    code, report = run_check(tmp_path, tiny_assets, training={
        "deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}})
    assert code == 1
    assert any(f["check"] == "engine" and "overlap_comm = false" in f["message"] for f in report["findings"])
    code, report = run_check(tmp_path, tiny_assets, training={
        "deepspeed": {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "nvme"}}}})
    assert code == 2, "stage 0 is an invalid recipe"
    said = [text for f in report["findings"] for text in [f["message"], *f["details"]] if "stage" in text]
    assert len(said) == 1 and "ZeRO stages 1, 2 and 3" in said[0], "the stage is named once, by validation"
    assert any(f["check"] == "engine" and "nvme" in f["message"] for f in report["findings"]), (
        "an invalid DeepSpeed recipe still learns its engine pitfalls")


def test_check_splits_memory_per_rank_as_each_zero_stage_does(tmp_path, tiny_assets):
    """The tiny model's GiB round to 0: the lines' written arithmetic says what was split."""
    zero = lambda stage: {"deepspeed": {"zero_optimization": {"stage": stage}}}  # noqa: E731
    line = lambda r, start: next(x for x in r["memory"]["lines"] if x["what"].startswith(start))  # noqa: E731
    _, one = run_check(tmp_path, tiny_assets, training=zero(3))
    _, zero3 = run_check(tmp_path, tiny_assets, "--world-size", "4", training=zero(3))
    _, zero2 = run_check(tmp_path, tiny_assets, "--world-size", "4", training=zero(2))
    assert zero3["memory"]["sharding"] == "ZeRO-3" and zero2["memory"]["sharding"] == "ZeRO-2"
    assert not one["memory"]["sharded"], "one rank: nothing to split"
    assert line(zero3, "weights")["arithmetic"].endswith(") / 4"), "ZeRO-3 partitions the weights"
    assert "/ 4" not in line(zero2, "weights")["arithmetic"], "ZeRO-2 keeps every weight on every rank"
    assert line(zero2, "LoRA")["arithmetic"].endswith(") / 4"), "... and splits the trainable state"
    assert any(x["what"].startswith("ZeRO-3: two layers gathered") for x in zero3["memory"]["lines"])
