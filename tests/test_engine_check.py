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


def test_deepspeed_overlap_comm_and_bf16_overflow(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                  "bf16": {"enabled": True, "check_grad_overflow": False}}))
    found = messages(findings({"deepspeed": str(config)}, QuantizationSection(), {}, None))
    assert "fsdp = true" in found[0], "DeepSpeed itself is refused, pointing to FSDP2"
    assert any("overlap_comm = false" in m for m in found)
    assert any("check_grad_overflow" in m for m in found)


def test_mixed_modality_under_sharded_engines_offers_the_fix(tmp_path, tiny_assets):
    data = tmp_path / "mixed.jsonl"
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    data.write_text(tiny_assets["train"].read_text() + json.dumps(text_only) + "\n")
    assert modality_mix(data, 100)[1] == 1
    (hang,) = [m for m in messages(findings(FSDP2, QuantizationSection(), {}, str(data))) if "hangs" in m]
    assert "same on every rank" in hang and "placeholder image" in hang
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


def test_check_flags_fsdp_uint8_storage_and_shards_memory_per_rank(tmp_path, tiny_assets):
    code, report = run_check(tmp_path, tiny_assets, training=FSDP2, quantization={"load_in_4bit": True})
    assert code == 1
    assert any(f["check"] == "engine" and "uint8" in f["message"] for f in report["findings"])
    _, one = run_check(tmp_path, tiny_assets, training=FSDP2)
    _, four = run_check(tmp_path, tiny_assets, "--world-size", "4", training=FSDP2)
    weights = lambda r: next(x["gib"] for x in r["memory"]["lines"] if x["what"].startswith("weights"))  # noqa: E731
    assert four["memory"]["sharded"] and not one["memory"]["sharded"]
    assert weights(four) == round(weights(one) / 4, 3) or abs(weights(four) - weights(one) / 4) < 1e-3


def test_check_on_a_deepspeed_recipe_is_refused_with_its_pitfalls(tmp_path, tiny_assets):
    code, report = run_check(tmp_path, tiny_assets, training={
        "deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}})
    assert code == 2
    assert any("use FSDP2" in d for f in report["findings"] for d in f["details"])
    assert any(f["check"] == "engine" and "overlap_comm = false" in f["message"] for f in report["findings"])
