"""``stabguard check RUN_DIR``: what can be checked of a plain Hugging Face run directory, without a recipe.

A run made with the Trainer alone (LLaMA-Factory, a script of one's own) leaves an output directory:
``trainer_state.json`` (its log history), ``training_args.bin`` (the arguments, a pickle), and with PEFT
``adapter_config.json`` (the base model, the LoRA targets), at the top or in ``checkpoint-N/``. From them:

- the run's arguments against DeepSpeed's known pitfalls;
- the stack of *this* machine and the run's precision, engine and model against ``known_bad.toml``;
- what the log history shows (``stabguard report``'s diagnosis: non-finite losses, grad-norm spikes, ...);
- every checkpoint against its manifest (``stabguard.checkpoints``): which ones verify, which are damaged.

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
    found = sorted((p for p in path.glob(f"checkpoint-*/{name}") if p.parent.name[len("checkpoint-"):].isdigit()),
                   key=lambda p: int(p.parent.name[len("checkpoint-"):]))
    return found[-1] if found else None


def _json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}


def training_args(path: Path) -> dict[str, Any]:
    """The fields of ``training_args.bin`` the checks read (None where the file or the field is absent)."""
    from stabguard.trainer_state import training_arg

    return {name: training_arg(path, name) for name in ("fp16", "bf16", "deepspeed", "fsdp", "fsdp_config")}


def model_facts(path: Path) -> dict[str, Any]:
    """The base model's name and quantization, from the adapter's and the model's configs."""
    adapter = _json(_newest(path, "adapter_config.json"))
    base = adapter.get("base_model_name_or_path")
    config = _json(_newest(path, "config.json")) or (_json(Path(base) / "config.json") if base else {})
    quantization = config.get("quantization_config") or {}
    return {"model": base or config.get("_name_or_path"),
            "quantization": "4bit" if quantization.get("load_in_4bit") or quantization.get("_load_in_4bit") else "none"}


def check_run_dir(path: str | Path, *, probe: bool = False) -> Report:
    """Every check a plain run directory allows; the findings in ``report.findings``, as ``preflight``'s."""
    from stabguard.engine_check import deepspeed_config, deepspeed_findings, engine_spec
    from stabguard.probe import environment_facts, known_bad, precision_of, stack_findings

    path = Path(path)
    report = Report(str(path))
    found = [name for name in ("trainer_state.json", "training_args.bin", "adapter_config.json", "config.json")
             if _newest(path, name)]
    report.add("run directory", "ok", f"a Hugging Face run directory (no recipe): {', '.join(found)}")
    saved = "training_args.bin" in found
    if not saved:
        report.add("run directory", "info", "no training_args.bin: precision and engine unknown, their checks skipped")
    training = {k: v for k, v in training_args(path).items() if v is not None}
    if training.get("deepspeed"):
        for level, message in deepspeed_findings(deepspeed_config(training["deepspeed"]), training):
            report.add("engine", level, message)
    facts = {**environment_facts(), **model_facts(path), "attn_implementation": None, "max_length": None,
             "engine": engine_spec(training).kind if saved else None,
             "precision": precision_of(training) if saved else None}
    stack = stack_findings(facts)
    for level, message, details in stack:
        report.add("stack", level, message, details)
    if not stack:
        report.add("stack", "ok", f"no known-bad combination of this machine's stack and the run's precision, "
                   f"engine and model ({len(known_bad())} known)")
    _history(path, report)
    _checkpoints(path, report)
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


CHECKPOINT_LEVELS = {"verified": "ok", "legacy": "warn", "trainer-only": "info", "incomplete": "warn", "damaged": "error"}
CHECKPOINT_SAYS = {"verified": "verified (every file as its manifest says)",
                   "legacy": "saved before manifests (resumable; only the files' formats checked)",
                   "trainer-only": "no stabguard manifest, written by the Trainer alone (only the files' formats checked)",
                   "incomplete": "incomplete: the save did not finish (skipped by --resume)",
                   "damaged": "damaged (skipped by --resume last)"}


def _checkpoints(path: Path, report: Report) -> None:
    """Every checkpoint (and the final save) verified against its manifest: one line per outcome."""
    from stabguard.checkpoints import MANIFEST_FILE, checkpoints, verify

    found = [verify(folder) for folder in reversed(checkpoints(path))]
    if (path / MANIFEST_FILE).is_file():
        final = verify(path)
        final.folder = Path("final save")
        found.append(final)
    for status, level in CHECKPOINT_LEVELS.items():
        same = [v for v in found if v.status == status]
        if same:
            details = [v.describe() for v in same] if status == "damaged" else []
            report.add("checkpoints", level, f"{', '.join(v.folder.name for v in same)}: {CHECKPOINT_SAYS[status]}",
                       details, values={"status": status, "folders": [v.folder.name for v in same]})
