"""Unsloth's vision fine-tune with the guarded step: FastVisionModel + guarded(trl.SFTTrainer), on one GPU.

Run it (a CUDA GPU, in an environment with unsloth and stabguard installed; nothing is downloaded):

    pip install unsloth ./stabguard dashscope tiktoken
    python bench/gpu/unsloth.py

Unsloth refuses vision models without a GPU ("Unsloth: vision / audio models are not supported on the CPU
backend yet", unsloth 2026.10.9), so this is the GPU script's framework row; it has not run yet (no GPU
in the development sessions so far). It builds the tiny Qwen3-VL with the real Qwen token ids, loads it
through ``FastVisionModel`` with LoRA on the language layers, puts a NaN into one LoRA gradient at step 3
(``stabguard.faults``) and prints one line per check: the step skipped, the LR held, the adapter finite,
the mask guard's audit of the labels Unsloth's collator builds, and the seconds per step.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

STEPS, NAN_AT = 6, 3


def refuse_without_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        print("unsloth bench: no CUDA GPU visible to torch; Unsloth runs vision models on GPUs only. Nothing run.",
              file=sys.stderr)
        raise SystemExit(2)


def unsloth_dataset(train_jsonl: Path) -> list[dict]:
    """The synthetic boards as Unsloth's vision notebooks write them: typed content with PIL images."""
    from PIL import Image

    rows = []
    for line in train_jsonl.read_text().splitlines():
        messages = []
        for message in json.loads(line)["messages"]:
            content = message["content"]
            content = [{"type": "text", "text": content}] if isinstance(content, str) else content
            messages.append({"role": message["role"], "content": [
                {"type": "image", "image": Image.open(train_jsonl.parent / c["image"]).convert("RGB")}
                if c["type"] == "image" else c for c in content]})
        rows.append({"messages": messages})
    return rows


def main() -> None:
    refuse_without_gpu()
    from unsloth import FastVisionModel, is_bf16_supported  # first: Unsloth patches transformers and TRL
    from unsloth.trainer import UnslothVisionDataCollator

    import trl

    from stabguard import guarded
    from stabguard.testing import build_tiny_assets

    root = Path(tempfile.mkdtemp(prefix="stabguard-unsloth-"))
    assets = build_tiny_assets(root / "assets", tokenizer="qwen")
    model, processor = FastVisionModel.from_pretrained(str(assets["model"]), load_in_4bit=False)
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                           r=8, lora_alpha=16, lora_dropout=0, random_state=0)
    FastVisionModel.for_training(model)
    args = trl.SFTConfig(output_dir=str(root / "out"), max_steps=STEPS, per_device_train_batch_size=2,
                         learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                         save_strategy="no", report_to="none", seed=0, bf16=is_bf16_supported(),
                         fp16=not is_bf16_supported(), remove_unused_columns=False, dataset_text_field="",
                         dataset_kwargs={"skip_prepare_dataset": True}, max_length=1024)
    trainer = guarded(trl.SFTTrainer)(
        model=model, args=args, train_dataset=unsloth_dataset(assets["train"]), processing_class=processor,
        data_collator=UnslothVisionDataCollator(model, processor), plugin_modules=["stabguard.faults"],
        guards={"nonfinite": {}, "grad_norm": {}, "spike": {}, "mask": {"policy": "warn"},
                "faults": {"nan_grad_at": [NAN_AT]}})
    start = time.perf_counter()
    trainer.train()
    report(trainer, (time.perf_counter() - start) / STEPS)


def report(trainer, seconds_per_step: float) -> None:
    events = trainer.events.events
    skips = [(e["guard"], e["step"]) for e in events if e["kind"] == "skip"]
    lrs = {e["step"]: e["values"].get("learning_rate") for e in events if e["kind"] == "log"}
    finite = all(math.isfinite(float(p.float().abs().sum())) for p in trainer.model.parameters() if p.requires_grad)
    mask = [e["message"] for e in events if e["guard"] == "mask" and e["kind"] in ("finding", "info")]
    rows = [("NaN step skipped", skips == [("nonfinite", NAN_AT)], skips),
            ("LR held on it", lrs.get(NAN_AT) in (lrs.get(NAN_AT - 1), lrs.get(NAN_AT + 1)), lrs),
            ("adapter finite", finite, ""), ("labels audited", bool(mask), mask[:3]),
            ("s/step", True, f"{seconds_per_step:.3f}")]
    for name, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<18} {detail}")
    raise SystemExit(0 if all(ok for _, ok, _ in rows) else 1)


if __name__ == "__main__":
    main()
