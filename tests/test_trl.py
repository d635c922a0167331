"""Guards inside TRL's SFTTrainer: ``stabguard.guarded(SFTTrainer)`` on the tiny Qwen3-VL, with TRL's own VLM
data path and collator. An injected NaN gradient is skipped; the mask guard audits the labels TRL builds."""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402
from support_faults import GradFault, StepProbe, guard_plugins  # noqa: E402

from stabguard import guarded  # noqa: E402


def trl_dataset(train_jsonl):
    """The synthetic PCB rows in TRL's VLM format: {"type": "image"} placeholders and an "images" column."""
    rows = []
    for line in train_jsonl.read_text().splitlines():
        row, images, messages = json.loads(line), [], []
        for message in row["messages"]:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            for item in content:
                if item["type"] == "image":
                    images.append(Image.open(train_jsonl.parent / item["image"]).convert("RGB"))
            messages.append({"role": message["role"],
                             "content": [{"type": "image"} if c["type"] == "image" else c for c in content]})
        rows.append({"messages": messages, "images": images})
    return datasets.Dataset.from_list(rows)


def sft_trainer_kwargs(tmp_path, tiny_assets) -> dict:
    """What SFTTrainer is built with here: the tiny model, TRL's VLM data, LoRA on q/v, 4 steps."""
    from peft import LoraConfig
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_assets["model"])
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=1, use_cpu=True,
                         logging_steps=1, report_to="none", max_length=None, learning_rate=1e-3, save_strategy="no",
                         seed=0)
    return {"model": model, "args": args, "train_dataset": trl_dataset(tiny_assets["train"]),
            "processing_class": processor,
            "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}


def sft_trainer(tmp_path, tiny_assets, **guard_kwargs):
    return guarded(trl.SFTTrainer)(**sft_trainer_kwargs(tmp_path, tiny_assets), **guard_kwargs)


def test_a_nan_gradient_in_sft_trainer_is_skipped_and_the_weights_stay_finite(tmp_path, tiny_assets, capfd):
    probe = StepProbe()
    plugins = guard_plugins(GradFault(at={2}, value=float("nan")), probe, guards=("nonfinite", "grad_norm"))
    plugins.enable_guards({})  # stabguard run enables them from the recipe
    trainer = sft_trainer(tmp_path, tiny_assets, plugins=plugins)
    plugins.hook.setup_model(model=trainer.model, processor=trainer.processing_class, recipe=None,
                             events=trainer.events)  # with plugins given, the caller fires the set-up hooks
    trainer.train()
    assert probe.verdicts == {1: "PROCEED", 2: "SKIP", 3: "PROCEED", 4: "PROCEED"}
    assert probe.lrs[3] == probe.lrs[2], "the LR scheduler held on the skipped step"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
    (skip,) = trainer.events.of_kind("skip")
    assert skip["guard"] == "nonfinite" and skip["step"] == 2
    assert (tmp_path / "out" / "events.jsonl").exists()
    assert "nonfinite skip  step 2 skipped" in capfd.readouterr().err, "the decision on the console, as in a run"


def test_the_mask_guard_reports_the_prompt_tokens_sft_trainer_supervises(tmp_path, tiny_assets):
    """TRL's default VLM collator supervises the whole conversation: the prompt and the image tokens too."""
    trainer = sft_trainer(tmp_path, tiny_assets, guards={"mask": {"policy": "warn"}, "nonfinite": {}})
    trainer.train()
    findings = [e["message"] for e in trainer.events.of_kind("finding") if e["guard"] == "mask"]
    assert findings and all("labels are not the assistant replies" in f for f in findings)
    assert any("vision/padding tokens supervised" in f for f in findings)
