"""The framework integration tests' shared parts: the tiny model with Qwen's real token ids, the synthetic
boards in each framework's dataset format, and what every guarded framework run must show.

Each test (tests/integrations/test_<framework>.py) runs the framework's own command line on the tiny
Qwen3-VL, with a NaN put into one LoRA gradient at step ``NAN_AT`` by ``stabguard.faults``, and checks
:func:`assert_guarded`: the step skipped and written to events.jsonl, the learning rate held for it, the
weights finite, and the mask guard's audit of the labels the framework built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import load_file

from stabguard.events import read_events

NAN_AT, STEPS = 3, 5
GUARDS = {"nonfinite": {}, "grad_norm": {}, "spike": {}, "mask": {}, "faults": {"nan_grad_at": [NAN_AT]}}
PLUGINS = ["stabguard.faults"]


def rows(assets) -> list[dict]:
    return [json.loads(line) for line in Path(assets["train"]).read_text().splitlines() if line.strip()]


def parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def image_path(assets, item: dict) -> str:
    return str((Path(assets["train"]).parent / item["image"]).resolve())


def with_image_tags(assets, row: dict) -> dict:
    """``{"messages": [{"role", "content": "<image>text"}], "images": [absolute paths]}``: the form of
    ms-swift and LLaMA-Factory (sharegpt with an ``images`` column)."""
    messages, images = [], []
    for message in row["messages"]:
        text = ""
        for item in parts(message["content"]):
            if item["type"] == "image":
                text += "<image>"
                images.append(image_path(assets, item))
            else:
                text += item["text"]
        messages.append({"role": message["role"], "content": text})
    return {"messages": messages, "images": images}


def with_absolute_images(assets, row: dict) -> dict:
    """Content as lists of typed items throughout, image paths absolute: the form of Axolotl's
    multimodal chat_template datasets (one column type per key)."""
    messages = [{"role": m["role"], "content": [
        {"type": "image", "image": image_path(assets, item)} if item["type"] == "image" else item
        for item in parts(m["content"])]} for m in row["messages"]]
    return {"id": row.get("id"), "messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_guarded(output_dir: Path, adapter: Path) -> list[dict]:
    """What every guarded run with a NaN gradient at step NAN_AT must show; returns the run's events."""
    events = read_events(Path(output_dir) / "events.jsonl")
    skips = [(e["guard"], e["step"]) for e in events if e["kind"] == "skip"]
    assert skips == [("nonfinite", NAN_AT)], f"the NaN step and only it is skipped: {skips}"
    lrs = {e["step"]: e["values"]["learning_rate"] for e in events if e["kind"] == "log"}
    assert sorted(lrs) == list(range(1, STEPS + 1)), f"one log line per step: {sorted(lrs)}"
    # A linear schedule moves at every step but the skipped one. Frameworks log the LR a step used (HF) or
    # the one after it (ms-swift), so the repeated value sits on either side of the skipped step.
    held = [(s, s + 1) for s in range(1, STEPS) if lrs[s] == lrs[s + 1]]
    assert held in ([(NAN_AT - 1, NAN_AT)], [(NAN_AT, NAN_AT + 1)]), f"the skipped step alone held the LR: {lrs}"
    assert all(lrs[s] >= lrs[s + 1] for s in range(1, STEPS)), f"a linear decay: {lrs}"
    weights = load_file(adapter)
    assert weights and all(math.isfinite(float(t.abs().sum())) for t in weights.values()), "the adapter is finite"
    audit = [e for e in events if e["guard"] == "mask" and "what the loss sees" in e["message"]]
    assert audit, "the mask guard audited the labels the framework built"
    return events


def mask_findings(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["guard"] == "mask" and e["kind"] == "finding"]


def seam_present(owner: str, name: str) -> bool:
    """``owner.name`` exists: an attribute of the module or class, or one its classes assign in their code."""
    import importlib
    import inspect

    module_path, _, attr = owner.rpartition(".")
    try:
        found = getattr(importlib.import_module(owner), name, None) is not None  # owner is a module
        if found:
            return True
    except ImportError:
        pass
    holder = getattr(importlib.import_module(module_path), attr)
    if hasattr(holder, name):
        return True
    return inspect.isclass(holder) and any(f"self.{name} =" in inspect.getsource(c) for c in holder.__mro__
                                           if c.__module__.split(".")[0] == holder.__module__.split(".")[0])
