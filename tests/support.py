"""Shared helpers for tests that run the real trainer on the tiny demo model (imported, not a fixture file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabguard import hookimpl
from stabguard.manager import HOOK_NAMES

# The Qwen3-VL chat format, as qwen3vl.md gives it: one user turn with an image, one assistant turn.
REFERENCE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Inspect this PCB.<|im_end|>\n"
    "<|im_start|>assistant\nDefect: open circuit.<|im_end|>\n"
)
CONVERSATION = [
    {"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "Inspect this PCB."},
    ]},
    {"role": "assistant", "content": "Defect: open circuit."},
]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # str, int, float: TOML accepts JSON's spelling


def toml_dumps(data: dict[str, Any]) -> str:
    """Enough TOML for recipes: top-level keys, tables, and tables of tables (``guards.<name>``)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        flat = {k: v for k, v in table.items() if not (isinstance(v, dict) and name == "guards")}
        lines += [f"\n[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in flat.items()]
        for sub, subtable in table.items():
            if isinstance(subtable, dict) and name == "guards":
                lines += [f"\n[{name}.{sub}]"] + [f"{k} = {toml_value(v)}" for k, v in subtable.items()]
    return "\n".join(lines) + "\n"


def tiny_recipe(assets: dict[str, Path], output_dir: Path, *, training: dict | None = None,
                guards: dict | None = None, data: dict | None = None, **top: Any) -> dict[str, Any]:
    """A recipe dict for the prebuilt tiny model and data (see the ``tiny_assets`` fixture)."""
    return {
        **top,
        "model": {"name_or_path": str(assets["model"]), "dtype": "float32", "max_pixels": 65536},
        "data": {"train": str(assets["train"]), "max_length": 512, **(data or {})},
        "training": {"output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_steps": 100, "use_cpu": True, "seed": 0, "max_grad_norm": 1.0,
                     **(training or {})},
        "lora": {"r": 4, "alpha": 8},
        "guards": guards or {},
    }


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(toml_dumps(recipe), encoding="utf-8")
    return path


class HookRecorder:
    """Implements every hook (called first, ``tryfirst``) and records the order in which they fire."""

    def __init__(self):
        self.calls: list[str] = []


def _recording(name: str):
    def impl(self):
        self.calls.append(name)

    impl.__name__ = name
    return hookimpl(tryfirst=True)(impl)


for _name in HOOK_NAMES:
    if _name not in ("register_guards",):
        setattr(HookRecorder, _name, _recording(_name))
