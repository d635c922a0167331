"""Preflight of the training engine: the known failures of FSDP2 and DeepSpeed with Qwen-VL, each with its fix.

Each check reads only the recipe (and the DeepSpeed JSON or the data file it names); nothing is launched.
``findings`` returns ``(level, message)`` pairs; ``stabguard check`` shows them under "engine".
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any

MIXED_FIX = ("data.text_only_image = true (text-only samples get a small blank image, so every rank runs the "
             "vision tower), or keep each step's modality the same on every rank (batches of only image or only "
             "text-only samples, in the same order on every rank)")


@dataclass(frozen=True)
class EngineSpec:
    """The engine a recipe's ``[training]`` asks for, read once; every config-time check shares it."""

    kind: str  # "single/ddp", "fsdp2" (``fsdp`` set, whatever its version) or "deepspeed"
    deepspeed: dict = field(default_factory=dict)  # DeepSpeed's config; {} when unreadable (validation says why)
    fsdp_version: int | None = None

    @property
    def zero_stage(self) -> int | None:
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0) if self.kind == "deepspeed" else None

    @property
    def sharding(self) -> str | None:
        """How the engine splits memory over ranks: "FSDP2", "ZeRO-1/2/3", or None (single device, DDP)."""
        if self.kind == "fsdp2":
            return "FSDP2"
        return f"ZeRO-{self.zero_stage}" if self.zero_stage in (1, 2, 3) else None


def engine_spec(training: dict[str, Any]) -> EngineSpec:
    config = training.get("fsdp_config") or {}
    version = (int(config.get("version", 2)) if isinstance(config, dict) else 2) if training.get("fsdp") else None
    if training.get("deepspeed"):  # FSDP as well is a recipe error; its version is still read for the checks
        return EngineSpec("deepspeed", deepspeed=deepspeed_config(training["deepspeed"]), fsdp_version=version)
    return EngineSpec("fsdp2" if version is not None else "single/ddp", fsdp_version=version)


FSDP1_REFUSED = "FSDP1 is not supported (it flattens parameters); write fsdp_config.version = 2 (FSDP2)"


def engine_of(training: dict[str, Any]) -> str:
    return engine_spec(training).kind


def findings(recipe_training: dict[str, Any], quantization, guards: dict, data_train: str | None,
             rows: int = 2000, text_only_image: bool = False) -> list[tuple[str, str]]:
    spec = engine_spec(recipe_training)
    out: list[tuple[str, str]] = []
    if spec.kind == "fsdp2":
        out += fsdp_findings(recipe_training, quantization, guards)
    if spec.kind == "deepspeed":
        out += deepspeed_findings(spec.deepspeed, recipe_training, guards)
    if spec.sharding in ("FSDP2", "ZeRO-3") and data_train:  # ranks gather weights per module: calls must match
        images, text_only = modality_mix(data_train, rows)
        if images and text_only and text_only_image:
            out.append(("info", f"{data_train}: {text_only} text-only samples in the first {rows} rows get a "
                        f"placeholder image (data.text_only_image): every rank runs the vision tower"))
        elif images and text_only:
            out.append(("error", f"{data_train}: {images} samples with images and {text_only} text-only in the first "
                        f"{rows} rows: under {spec.kind} a rank with a text-only batch skips the vision tower, whose "
                        f"sharded weights the other ranks gather, and training hangs or stops (QwenLM/Qwen3-VL#126, "
                        f"ms-swift#3213); fix: {MIXED_FIX}"))
    return out


def fsdp_findings(training: dict, quantization, guards: dict) -> list[tuple[str, str]]:
    config = training.get("fsdp_config") or {}
    out = []
    if quantization.load_in_4bit and quantization.quant_storage == "uint8":
        out.append(("error", "FSDP2 with 4-bit weights in uint8 storage trains with loss 0 / grad_norm nan "
                    "(accelerate#3983); fix: quantization.quant_storage = \"bfloat16\" (the model's dtype)"))
    if quantization.load_in_4bit and str(config.get("cpu_ram_efficient_loading", "false")).lower() != "true":
        out.append(("warn", "QLoRA under FSDP loads the full model on every rank; fix: "
                    "fsdp_config.cpu_ram_efficient_loading = true"))
    optim8 = guards.get("optim8bit")
    paged = "paged" in str(training.get("optim", "")) or bool(optim8 and optim8.enabled and optim8.paged)
    if paged:
        out.append(("error", "a paged 8-bit optimizer fails to checkpoint under FSDP + QLoRA (peft docs); fix: "
                    "guards.optim8bit.paged = false, or training.optim = \"adamw_torch\""))
    elif optim8 is not None and optim8.enabled:
        out.append(("warn", "guards.optim8bit under FSDP2: bitsandbytes' 8-bit state over sharded DTensor "
                    "parameters has not been run by stabguard; fix: [guards.optim8bit] enabled = false (torch AdamW)"))
    if str(config.get("activation_checkpointing", "false")).lower() == "true" and (
            training.get("activation_checkpointing") or training.get("gradient_checkpointing")):
        out.append(("error", "fsdp_config.activation_checkpointing and training.activation_checkpointing are both "
                    "on (the Trainer refuses); fix: keep FSDP's own, set activation_checkpointing = false"))
    return out


def read_deepspeed_config(value: Any) -> dict:
    """``training.deepspeed``: an inline table, or the path of a DeepSpeed JSON config (ValueError naming it)."""
    if isinstance(value, dict):
        return value
    try:
        config = json.loads(Path(value).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{value}: cannot read the DeepSpeed config ({exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"{value}: not a JSON DeepSpeed config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{value}: a DeepSpeed config is a JSON object, not {type(config).__name__}")
    return config


def deepspeed_config(value: Any) -> dict:
    """The DeepSpeed config, or {} when it cannot be read (recipe validation names that error)."""
    try:
        return read_deepspeed_config(value)
    except ValueError:
        return {}


def deepspeed_findings(config: dict, training: dict, guards: dict | None = None) -> list[tuple[str, str]]:
    """The failures DeepSpeed configs run into with Qwen-VL, and what the guarded step needs."""
    zero = config.get("zero_optimization", {})  # its stage and compute_grad_norm: recipe validation
    out = []
    if importlib.util.find_spec("deepspeed") is None:
        out.append(("error", "DeepSpeed is not installed; fix: pip install 'stabguard[deepspeed]'"))
    if zero.get("stage") == 2 and zero.get("overlap_comm"):
        out.append(("error", "ZeRO-2 with overlap_comm gives grad_norm nan, loss 0 on Qwen2-VL/2.5-VL LoRA "
                    "(DeepSpeed#5347); fix: zero_optimization.overlap_comm = false"))
    optim8 = (guards or {}).get("optim8bit")
    if optim8 is not None and optim8.enabled:
        out.append(("warn", "guards.optim8bit under DeepSpeed: bitsandbytes' AdamW8bit steps ZeRO's flat fp32 "
                    "partitions (DeepSpeed calls it an untested optimizer); stabguard ran it on CPU only; fix: "
                    "[guards.optim8bit] enabled = false (torch AdamW, as the ZeRO recipes do)"))
    nonfinite = (guards or {}).get("nonfinite")
    if nonfinite is not None and not nonfinite.enabled:
        out.append(("warn", "guards.nonfinite is off: DeepSpeed's own skip sees only a non-finite gradient norm "
                    "(ZeRO-1/2 in bf16 only with bf16.check_grad_overflow), "
                    "never a NaN loss with finite gradients; fix: [guards.nonfinite] enabled = true"))
    offloads = [zero.get(key, {}).get("device") for key in ("offload_optimizer", "offload_param")]
    if "nvme" in offloads:
        out.append(("warn", "offload to nvme: stabguard's snapshots copy the ZeRO partitions in memory and "
                    "were not run with partitions swapped out to NVMe; fix: offload to \"cpu\", or "
                    "[snapshots] every = 0 (no rollback)"))
    return out


def modality_mix(path: str | Path, rows: int) -> tuple[int, int]:
    """(samples with an image, text-only samples) in the first ``rows`` rows of a conversation JSONL."""
    images = text_only = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= rows:
                    break
                if line.strip():
                    has = '"image"' in line or '"video"' in line
                    images, text_only = images + has, text_only + (not has)
    except OSError:
        pass
    return images, text_only
