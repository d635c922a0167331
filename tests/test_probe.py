"""stabguard/probe.py (``stabguard check --probe``): each fault is made to happen on the tiny Qwen3-VL and
the probe names it; a healthy recipe gives no finding."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support import tiny_recipe, write_recipe
from support_faults import Amplify, CutPath, DropsNumItems

from stabguard import hookimpl
from stabguard.probe import known_bad, matches, stack_findings
from stabguard.testing import run_probe

GUARDS = ("mask", "vision_freeze", "nonfinite", "grad_norm", "precision")


def recipe_for(tmp_path, assets, **sections):
    return write_recipe(tmp_path / "recipe.toml", tiny_recipe(assets, tmp_path / "out", **sections))


def probe_findings(report, level=None) -> list:
    return [f for f in report.findings if f.check.startswith("probe") and (level is None or f.level == level)]


def problems(report) -> list[str]:
    return [f"{f.check}: {f.message}" for f in probe_findings(report) if f.level in ("warn", "error")]


def test_a_healthy_recipe_gives_no_finding(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), guards=GUARDS)
    assert problems(report) == []
    checks = {f.check for f in probe_findings(report, "ok")}
    assert {"probe: gradients", "probe: activations", "probe: accumulation", "probe: pixels", "probe: stack"} <= checks
    assert not (tmp_path / "out").exists(), "the probe writes nothing into the run's folder"


def test_adapters_behind_a_cut_gradient_path_are_named(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), CutPath(), guards=GUARDS)
    (finding,) = [f for f in probe_findings(report, "error") if f.check == "probe: gradients"]
    assert "got no gradient" in finding.message
    assert finding.details and all(d.startswith("language_model.layers.0.") for d in finding.details), (
        "layer 0's adapters (before the cut) are named, layer 1's are not")
    assert any(d == "language_model.layers.0.self_attn.q_proj (lora_B)" for d in finding.details)


def test_a_real_run_says_so_at_its_first_step(tmp_path, tiny_assets):
    from support_faults import run_guarded

    from stabguard.events import read_events

    result, _ = run_guarded(tmp_path, tiny_assets, CutPath(), training={"max_steps": 2})
    findings = [e for e in read_events(result.output_dir / "events.jsonl")
                if e["kind"] == "finding" and "got no gradient" in e["message"]]
    assert [e["step"] for e in findings] == [1], "once, at the first step"
    assert all(n.startswith("base_model.model.model.language_model.layers.0.") for n in findings[0]["values"]["missing"])


def test_a_module_past_fp16s_range_is_named(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), Amplify("language_model.layers.0.mlp.down_proj"),
                       guards=GUARDS)
    (finding,) = [f for f in probe_findings(report) if f.check == "probe: activations"]
    assert finding.level == "warn", "an fp32 run holds it; fp16 would not"
    assert finding.message.startswith("fp16 would overflow at language_model.layers.0.mlp.down_proj (max ")
    assert finding.values["max"] > 65504


def test_a_forward_that_drops_num_items_in_batch_is_off_by_the_accumulation(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), DropsNumItems(), guards=GUARDS, batches=3)
    (finding,) = [f for f in probe_findings(report) if f.check == "probe: accumulation"]
    assert finding.level == "error" and "ignores num_items_in_batch" in finding.message
    assert finding.values["factor"] == pytest.approx(3, rel=0.25)


class RescaleTwice:
    """The processor divides pixels by 255 once more (ms-swift#2280)."""

    @hookimpl
    def setup_model(self, processor):
        processor.image_processor.rescale_factor = 1 / 255 / 255


def test_images_rescaled_twice_are_flagged(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), RescaleTwice(), guards=GUARDS)
    (finding,) = [f for f in probe_findings(report) if f.check == "probe: pixels"]
    assert finding.level == "error" and "rescaled twice" in finding.message
    assert finding.values["max"] - finding.values["min"] < 0.05


class Unfreeze:
    """Something after vision_freeze makes a vision block trainable again."""

    @hookimpl(trylast=True)
    def setup_model(self, model):
        for name, p in model.named_parameters():
            if ".visual.blocks.0." in name:
                p.requires_grad_(True)


def test_a_gradient_into_the_frozen_tower_is_the_vision_guards_finding(tmp_path, tiny_assets):
    report = run_probe(recipe_for(tmp_path, tiny_assets), Unfreeze(), guards=GUARDS)
    (leak,) = [f for f in probe_findings(report, "error") if f.guard == "vision_freeze"]
    assert "gradients reached" in leak.message and "visual.blocks.0." in leak.details[0]


FACTS = {"torch": "2.12.0+cu128", "gpu": "NVIDIA H100 80GB HBM3", "attn_implementation": "sdpa", "cuda": "12.8",
         "precision": "bf16", "quantization": "none", "max_length": 2048, "engine": "single/ddp",
         "accelerate": "1.16.0", "model": "Qwen/Qwen3-VL-32B-Instruct"}


def test_the_known_bad_table_matches_on_versions_and_devices():
    (cudnn,) = stack_findings(FACTS)
    assert "cuDNN" in cudnn[1] and any("pytorch/pytorch#196678" in d for d in cudnn[2])
    assert stack_findings({**FACTS, "torch": "2.10.1"}) == [], "before the torch release it broke in"
    assert stack_findings({**FACTS, "gpu": "NVIDIA A100-SXM4-80GB"}) == []
    assert stack_findings({**FACTS, "gpu": None}) == [], "no GPU: an unknown fact matches nothing"
    assert stack_findings({**FACTS, "attn_implementation": "flash_attention_2"}) == []
    fp16 = stack_findings({**FACTS, "gpu": None, "precision": "fp16"})
    assert [level for level, _, _ in fp16] == ["error"] and "QwenLM/Qwen3#868" in fp16[0][2][1]
    assert matches({"max_length": ">=3072"}, {"max_length": 4096}) and not matches({"max_length": ">=3072"},
                                                                                    {"max_length": 2048})


def test_every_known_bad_entry_is_complete():
    for entry in known_bad():
        assert {"what", "when", "fix", "threads"} <= set(entry) and entry["threads"], entry
        assert entry.get("level", "warn") in ("info", "warn", "error")


def test_the_check_command_probes_and_prints_json(tmp_path, tiny_assets):
    from stabguard.cli.check import command

    result = CliRunner().invoke(command, [str(recipe_for(tmp_path, tiny_assets)), "--probe", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    step = next(f for f in report["findings"] if f["check"] == "probe: step")
    assert step["values"]["seconds"] > 0 and step["values"]["peak_bytes"] is None


def test_a_deepspeed_recipe_outside_torchrun_says_how_to_probe_it(tmp_path, tiny_assets, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    recipe = recipe_for(tmp_path, tiny_assets, training={"deepspeed": {"zero_optimization": {"stage": 2}}})
    report = run_probe(recipe, guards=GUARDS)
    (said,) = [f for f in probe_findings(report) if f.check == "probe"]
    assert said.level == "warn" and "torchrun --nproc-per-node N" in said.message and "--probe" in said.message
    assert not [f for f in probe_findings(report) if f.check.startswith("probe: ")], "nothing else was run"


def rank_record(**over):
    record = {"frozen_with_grad": [], "trainable": ["m.layers.0.q.lora_A.w", "m.layers.0.q.lora_B.w"], "unreached": [],
              "peaks": [("layers.0", 2.0)], "pixels": [(-1.0, 0.5)], "micro_batches": 2, "samples": 1,
              "loss": 2.0, "loss_sum": 20.0, "tokens": 10, "seconds": 0.5, "peak_bytes": None, "guards": []}
    return {**record, **over}


def test_the_ranks_records_merge_into_one_report():
    from stabguard.probe import merge

    said = {"check": "g", "level": "warn", "message": "odd", "details": [], "guard": "g", "values": {}}
    ok = {**said, "level": "ok", "message": "fine"}
    everyone = [rank_record(guards=[ok]),
                rank_record(peaks=[("layers.0", 9e5), ("lm_head", 1.0)], pixels=[(-2.0, 0.1)], loss=4.0,
                            loss_sum=40.0, tokens=30, seconds=0.7, frozen_with_grad=["visual.w"], guards=[ok, said])]
    tensors = {"m.layers.0.q.lora_A.w": 0.0, "m.layers.0.q.lora_B.w": 0.3}
    seen = merge(everyone, tensors, zero_b=set())
    assert dict(seen["peaks"]) == {"layers.0": 9e5, "lm_head": 1.0}, "the largest output of any rank"
    assert seen["pixels"] == (-2.0, 0.5) and seen["seconds"] == 0.7 and seen["ranks"] == 2
    assert seen["loss"] == 3.0 and seen["reference"] == 60.0 / 40, "ranks' mean loss; every rank's tokens"
    assert seen["gradients"].zero == ["m.layers.0.q.lora_A.w"] and seen["gradients"].frozen_with_grad == ["visual.w"]
    assert [g["message"] for g in seen["guards"]] == ["fine", "rank 1: odd"], "a finding of some ranks says which"
    assert merge(everyone, tensors, zero_b={"m.layers.0.q.lora_B.w"})["gradients"].zero == [], \
        "A's zero gradient is by design while its B is still zero"
    hooked = [rank_record(unreached=["m.layers.0.q.lora_B.w"]), rank_record(unreached=["m.layers.0.q.lora_B.w"])]
    assert merge(hooked, tensors, zero_b=set())["gradients"].missing == ["m.layers.0.q.lora_B.w"], \
        "a norm for it (ZeRO's zero partition) but no gradient arrived on any rank"
    assert merge([rank_record(unreached=["m.layers.0.q.lora_B.w"]), rank_record()], tensors,
                 zero_b=set())["gradients"].missing == [], "one rank's gradient is the step's"


def test_nan_pixels_are_named_as_such_not_as_no_image():
    """A corrupt image's NaN pixels were reported as "no image in the probed batches" (NaN min/max, and no
    image processor known inside a framework): now an error naming the non-finite values, whatever order
    the batches came in."""
    import math

    from stabguard.findings import Report
    from stabguard.probe import _pixel_span, check_pixels

    for batches in ([(-1.0, 1.0), (math.nan, math.nan)], [(math.nan, math.nan), (-1.0, 1.0)]):
        report = Report("r")
        check_pixels(None, _pixel_span(batches), report)
        (finding,) = report.findings
        assert finding.level == "error" and finding.message.startswith("pixel values are non-finite"), finding
    report = Report("r")
    check_pixels(None, _pixel_span([(-1.0, 1.0)]), report)
    assert report.findings[0].level == "info" and "(the guards were given no image processor)" in \
        report.findings[0].message
