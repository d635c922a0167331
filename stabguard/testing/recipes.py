"""Recipes for the tiny Qwen3-VL: the model and data built once, a recipe dict, and enough TOML to write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def build_tiny_assets(root: str | Path, tokenizer: str = "demo") -> dict[str, Path]:
    """A saved tiny random Qwen3-VL (with processor) and a small synthetic PCB train set under ``root``.

    Takes a few seconds on CPU; the pytest fixture ``stabguard_tiny_assets`` builds it once per session.
    ``tokenizer="qwen"``: the real Qwen vocabulary and token ids (see ``build_tiny_model``).
    :return: ``{"model": folder, "train": train.jsonl, "val": val.jsonl}``.
    """
    from stabguard.data.synth import synth_pcb
    from stabguard.models import build_tiny_model

    root = Path(root)
    model_dir = build_tiny_model(root / "model", seed=0, max_pixels=65536, tokenizer=tokenizer)
    synth_pcb(root / "data", n=8, seed=0, size=128, val_fraction=0.25)
    return {"model": model_dir, "train": root / "data" / "train.jsonl", "val": root / "data" / "val.jsonl"}


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
    """A recipe dict for the tiny model and data of :func:`build_tiny_assets`: batch 1, 2 steps, CPU, fp32.

    ``training``, ``guards``, ``data`` and ``lora`` (in ``top``) are merged into their sections; ``top``
    adds other top-level keys (``plugins``, ``snapshots``).
    """
    lora = {"r": 4, "alpha": 8, **(top.pop("lora", None) or {})}
    return {
        **top,
        "model": {"name_or_path": str(assets["model"]), "dtype": "float32", "max_pixels": 65536},
        "data": {"train": str(assets["train"]), "max_length": 512, **(data or {})},
        "training": {"output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_steps": 100, "use_cpu": True, "seed": 0, "max_grad_norm": 1.0,
                     **(training or {})},
        "lora": lora,
        "guards": guards or {},
    }


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_dumps(recipe), encoding="utf-8")
    return path
