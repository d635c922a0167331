"""``stabguard check RUN_DIR``: what can be checked of a plain Hugging Face run directory, without a recipe.

A run made with the Trainer alone (LLaMA-Factory, a script of one's own) leaves an output directory:
``trainer_state.json`` (its log history), ``training_args.bin`` (the arguments, a pickle), and with PEFT
``adapter_config.json`` (the base model, the LoRA targets), at the top or in ``checkpoint-N/``. From them:

- the run's arguments against DeepSpeed's known pitfalls and the precision rule (fp16 on a bf16 model);
- the stack of *this* machine and the run's precision, engine and model against ``known_bad.toml``;
- what the log history shows (``stabguard report``'s diagnosis: non-finite losses, grad-norm spikes, ...).

The probe needs the data, the LoRA settings and the guards' set-up, which a run directory does not hold:
``--probe`` says so, and names the recipe command that probes. ``training_args.bin`` is read with every
class replaced by an inert stand-in (``stabguard.trainer_state.training_arg``): nothing in it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabguard.check import Report

SEVERITY = {"ok": "ok", "warn": "warn", "trouble": "error"}


def is_run_dir(path: str | Path) -> bool:
    """A directory with what the Trainer writes: ``trainer_state.json`` or ``training_args.bin`` (top or in a
    checkpoint)."""
    path = Path(path)
    return path.is_dir() and any(next(path.glob(pattern), None) for pattern in (
        "trainer_state.json", "training_args.bin", "checkpoint-*/trainer_state.json", "checkpoint-*/training_args.bin"))


def _newest(path: Path, name: str) -> Path | None:
    """``name`` at the top of the run directory, else in its newest checkpoint."""
    if (path / name).is_file():
        return path / name
    found = sorted(path.glob(f"checkpoint-*/{name}"), key=lambda p: int(p.parent.name.split("-")[-1])
                   if p.parent.name.split("-")[-1].isdigit() else -1)
    return found[-1] if found else None


def _json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}


def training_args(path: Path) -> dict[str, Any]:
    """The fields of ``training_args.bin`` the checks read (None where the file or the field is absent)."""
    from stabguard.trainer_state import training_arg

    names = ("fp16", "bf16", "deepspeed", "fsdp", "fsdp_config", "gradient_accumulation_steps", "max_grad_norm",
             "learning_rate", "per_device_train_batch_size", "gradient_checkpointing")
    return {name: training_arg(path, name) for name in names}


def model_facts(path: Path) -> dict[str, Any]:
    """The base model's name, dtype and quantization, from the adapter's and the model's configs."""
    adapter = _json(_newest(path, "adapter_config.json"))
    base = adapter.get("base_model_name_or_path")
    config = _json(_newest(path, "config.json")) or (_json(Path(base) / "config.json") if base else {})
    quantization = (config.get("quantization_config") or {})
    return {
        "model": base or config.get("_name_or_path"),
        "dtype": config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype"),
        "quantization": "4bit" if quantization.get("load_in_4bit") or quantization.get("_load_in_4bit") else "none",
        "targets": adapter.get("target_modules"),
    }


def check_run_dir(path: str | Path, *, probe: bool = False) -> Report:
    """Every check a plain run directory allows; the findings in ``report.findings``, as ``preflight``'s."""
    from stabguard.engine_check import deepspeed_config, deepspeed_findings, engine_spec
    from stabguard.probe import environment_facts, known_bad, precision_of, stack_findings

    path = Path(path)
    report = Report(str(path))
    args = training_args(path)
    found = [name for name in ("trainer_state.json", "training_args.bin", "adapter_config.json", "config.json")
             if _newest(path, name)]
    report.add("run directory", "ok", f"a Hugging Face run directory (no recipe): {', '.join(found)}")
    if not _newest(path, "training_args.bin"):
        report.add("run directory", "info", "no training_args.bin: precision and engine unknown, their checks skipped")
    training = {k: v for k, v in args.items() if v is not None}
    model = model_facts(path)
    precision = precision_of(training)
    if training.get("deepspeed"):
        for level, message in deepspeed_findings(deepspeed_config(training["deepspeed"]), training):
            report.add("engine", level, message)
    facts = {**environment_facts(), "engine": engine_spec(training).kind if training else None,
             "precision": precision if _newest(path, "training_args.bin") else None, "model": model["model"],
             "quantization": model["quantization"], "attn_implementation": None, "max_length": None}
    if precision == "fp16" and str(model["dtype"]).endswith("bfloat16"):
        report.add("precision", "error", f"the run is fp16 on a model saved in bfloat16 ({model['model']}): "
                   "activations bf16 holds overflow fp16's 65504. Fix: bf16 = true, fp16 = false")
    stack = stack_findings(facts)
    for level, message, details in stack:
        report.add("stack", level, message, details)
    if not stack:
        report.add("stack", "ok", f"no known-bad combination of this machine's stack and the run's precision, "
                   f"engine and model ({len(known_bad())} known)")
    _history(path, report)
    if probe:
        report.add("probe", "info", "not run: a run directory holds no recipe (the data, LoRA settings and guards the "
                   "probe builds the step from); write one and run `stabguard check RECIPE --probe`")
    return report


def _history(path: Path, report: Report) -> None:
    """``stabguard report``'s diagnosis of the log history, as findings."""
    from stabguard.diagnosis import diagnose
    from stabguard.trainer_state import TrainerStateError, load_run

    try:
        run = load_run(path)
    except (TrainerStateError, OSError) as exc:
        report.add("history", "info", f"no log history read: {exc}")
        return
    for finding in diagnose(run).findings:
        report.add("history", SEVERITY.get(finding.severity, "warn"), finding.text)
