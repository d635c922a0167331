"""precision: fp16 on a bf16 checkpoint, risky low-precision stacks, and the wrong model class.

Two causes of the exploded run recipes/pcb_qwen3vl.toml was written after. Its fix set ``fp16=True`` on
Qwen3-VL-32B, a bfloat16 release: fp16's range (largest value 65504) overflows activations bf16 holds, a
known NaN source for Qwen models. And it first loaded the model with ``AutoModelForVision2Seq``, which
transformers 5 no longer has. Both are caught at ``configure``, before anything is loaded; the loaded
class is checked against the checkpoint's ``config.architectures`` at ``setup_model``. On CPU the guard
says what will really run (dtype ``auto`` loads float32 there; ``fp16 = true`` does nothing on CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from stabguard import GuardError, GuardOptions, hookimpl

NAME = "precision"


class Options(GuardOptions):
    fp16_on_bf16: Literal["error", "warn"] = Field(
        default="error", description="float16 training or weights on a checkpoint saved in bfloat16")
    risky: Literal["error", "warn"] = Field(
        default="warn", description="fp16 together with 4-bit weights and the 8-bit optimizer")
    model_class: Literal["error", "warn"] = Field(
        default="error", description="loaded class not among the checkpoint's config.architectures")


def read_config(name_or_path: str) -> tuple[dict | None, str | None]:
    """The checkpoint's config.json (a local folder, else the Hugging Face cache) and where it was found."""
    path = Path(name_or_path) / "config.json"
    if not path.is_file():
        from transformers.utils import cached_file

        try:
            found = cached_file(name_or_path, "config.json", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            found = None
        if found is None:
            return None, None
        path = Path(found)
    return json.loads(path.read_text(encoding="utf-8")), str(path)


def saved_dtype(config: dict) -> str | None:
    """The dtype the checkpoint was saved in (``dtype``, or ``torch_dtype`` before transformers 5)."""
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return section[key]
    return None


def fp16_requests(recipe) -> list[str]:
    """The recipe keys that ask for float16 somewhere."""
    found = []
    if recipe.training.get("fp16"):
        found.append("training.fp16 = true")
    if recipe.model.dtype == "float16":
        found.append('model.dtype = "float16"')
    if recipe.quantization.load_in_4bit and recipe.quantization.compute_dtype == "float16":
        found.append('quantization.compute_dtype = "float16"')
    return found


def guard_enabled(recipe, name: str) -> bool:
    options = (getattr(recipe, "guards", None) or {}).get(name)
    return options is not None and options.enabled


def on_cpu(recipe) -> bool:
    """Whether the recipe trains on a CPU. bf16 or 4-bit without ``use_cpu`` is a GPU recipe: checked on a
    machine without a GPU, its CPU behaviour is not what it will run with."""
    training = recipe.training
    gpu_recipe = bool(training.get("bf16")) or recipe.quantization.load_in_4bit
    return bool(training.get("use_cpu")) or (not torch.cuda.is_available() and not gpu_recipe)


def fp16_message(requests: list[str], dtype: str, where: str) -> str:
    if torch.cuda.is_available():
        device = "this GPU supports it" if torch.cuda.is_bf16_supported() else \
            "this GPU lacks bf16 (pre-Ampere): train in float32 there, or accept the risk with fp16_on_bf16 = \"warn\""
    else:
        device = "it needs an Ampere-or-newer GPU on the training machine"
    return (f"{NAME}: {', '.join(requests)} on a checkpoint saved in {dtype} ({where}): fp16's range (max 65504) "
            f"overflows activations bf16 holds, a known NaN source for Qwen models. Fix: bf16 = true, fp16 = false, "
            f"model.dtype = \"auto\" or \"bfloat16\", quantization.compute_dtype = \"bfloat16\" ({device}).")


def risky_message(requests: list[str]) -> str:
    return (f"{NAME}: risky precision stack: {', '.join(requests)} + 4-bit weights + the 8-bit optimizer "
            "(optim8bit): three reduced-precision stages at once (fp16 activations and loss scaling, NF4 weights "
            "dequantized to fp16, 8-bit optimizer state). Use bf16 for the run, or disable one of them.")


def cpu_summary(recipe) -> str:
    """What actually runs when training on CPU."""
    training, model, quant = recipe.training, recipe.model, recipe.quantization
    weights = "float32 (dtype auto loads float32 on CPU)" if model.dtype == "auto" else model.dtype
    if training.get("bf16"):
        compute = "bfloat16 autocast (CPU AMP; slow on most CPUs)"
    elif training.get("fp16"):
        compute = "no autocast: fp16 = true has no effect on CPU (no fp16 autocast or loss scaling there)"
    else:
        compute = "in the weights' dtype"
    parts = [f"on CPU: weights {weights}", f"arithmetic {compute}"]
    if quant.load_in_4bit:
        parts.append(f"4-bit {quant.quant_type} weights through bitsandbytes' CPU backend (slow)")
    if guard_enabled(recipe, "optim8bit"):
        paged = getattr(recipe.guards["optim8bit"], "paged", False)
        parts.append("AdamW8bit runs on the CPU" + (" (paged = true is ignored there)" if paged else ""))
    return "; ".join(parts)


def class_problem(model) -> str | None:
    """The loaded class against ``config.architectures`` (what the checkpoint was saved as)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    architectures = list(getattr(config, "architectures", None) or [])
    loaded = type(base).__name__
    if not architectures or loaded in architectures:
        return None
    where = getattr(config, "_name_or_path", "") or "the checkpoint"
    return (f"{NAME}: loaded {loaded}, but {where} config.json says architectures = {architectures}: "
            f"set model.model_class = {architectures[0]!r} (or 'AutoModelForImageTextToText')")


class PrecisionGuard:
    def __init__(self, options: Options):
        self.options = options
        self.dtype_checked = False

    def _report(self, level: str, message: str, events) -> None:
        if level == "error":
            raise GuardError(message)
        events.alert(NAME, message)

    @hookimpl
    def configure(self, recipe, events):
        from stabguard.models import resolve_model_class

        try:
            resolve_model_class(recipe.model.model_class)
        except ValueError as exc:
            raise GuardError(f"{NAME}: {exc}") from None
        requests = fp16_requests(recipe)
        if requests and recipe.quantization.load_in_4bit and guard_enabled(recipe, "optim8bit"):
            self._report(self.options.risky, risky_message(requests), events)
        self._check_dtype(recipe, events)
        if on_cpu(recipe):
            summary = cpu_summary(recipe)
            events.record(NAME, "info", summary)
            print(f"stabguard: {summary}", file=sys.stderr, flush=True)

    @hookimpl
    def setup_model(self, model, recipe, events):
        if not self.dtype_checked:  # a tiny model built on first use has a config.json only now
            self._check_dtype(recipe, events, model)
        problem = class_problem(model)
        if problem:
            self._report(self.options.model_class, problem, events)

    def _check_dtype(self, recipe, events, model=None) -> None:
        config, where = read_config(recipe.model.name_or_path)
        if config is None and model is not None:  # no config.json to read: the model's own (a skeleton's) config
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            dtype = getattr(base.config, "dtype", None)
            config, where = {"dtype": str(dtype).replace("torch.", "")} if dtype else None, "the model's config"
        if config is None:
            return
        self.dtype_checked = True
        requests, dtype = fp16_requests(recipe), saved_dtype(config)
        if requests and dtype == "bfloat16":
            self._report(self.options.fp16_on_bf16, fp16_message(requests, dtype, where), events)
        events.record(NAME, "info", f"checkpoint dtype {dtype or 'unknown'} ({where}); float16 requested by: "
                      f"{', '.join(requests) or 'nothing'}", saved_dtype=dtype, fp16=requests)


@hookimpl
def register_guards(register):
    register(NAME, Options, PrecisionGuard)
