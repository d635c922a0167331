"""Run folders for the monitor/report/diagnosis tests: hand-written HF ones and real tiny stabguard runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from support import tiny_recipe, write_recipe
from support_faults import GradFault



def hf_log_line(step: int, *, loss: float, grad_norm: float, lr: float, epoch: float) -> dict[str, Any]:
    return {"epoch": epoch, "grad_norm": grad_norm, "learning_rate": lr, "loss": loss, "step": step}


def hf_trainer_state(log_history: list[dict], *, max_steps: int, logging_steps: int = 10,
                     finished: bool = False) -> str:
    """``trainer_state.json`` text as transformers writes it: indent 2, sorted keys, bare NaN tokens."""
    history = list(log_history)
    last = history[-1]["step"] if history else 0
    if finished:
        history.append({"epoch": 1.0, "step": last, "total_flos": 1.0, "train_loss": 1.0,
                        "train_runtime": 123.4, "train_samples_per_second": 1.0, "train_steps_per_second": 1.0})
    state = {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None, "epoch": 1.0,
             "eval_steps": 500, "global_step": last, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": history, "logging_steps": logging_steps,
             "max_steps": max_steps, "num_input_tokens_seen": 0, "num_train_epochs": 1, "save_steps": 500,
             "stateful_callbacks": {}, "total_flos": 1.0, "train_batch_size": 2, "trial_name": None,
             "trial_params": None}
    return json.dumps(state, indent=2, sort_keys=True) + "\n"


def spiky_history(*, steps: int = 300, every: int = 5, spike: tuple[int, int] = (120, 135),
                  nan_steps: tuple[int, ...] = (150, 155), seed: int = 0) -> list[dict]:
    """A falling loss with warm-up/decay LR, a grad-norm spike over ``spike``, NaNs at ``nan_steps``.

    The NaN steps look like the users' reports: ``loss 0.0, grad_norm NaN``.
    """
    rng = random.Random(seed)
    lines = []
    for step in range(every, steps + 1, every):
        lr = 1e-4 * min(1.0, step / 30) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        loss = 2.5 * math.exp(-step / 150) + 1.0 + rng.uniform(-0.05, 0.05)
        norm = 0.4 + rng.uniform(-0.1, 0.1)
        if spike[0] <= step <= spike[1]:
            norm, loss = 12.0 + 10 * (step - spike[0]) / every, loss * 1.8
        if step in nan_steps:
            norm, loss = math.nan, 0.0
        lines.append(hf_log_line(step, loss=loss, grad_norm=norm, lr=lr, epoch=step / steps))
    return lines


def write_hf_run(folder: Path, history: list[dict] | None = None, *, max_steps: int = 300,
                 checkpoint: int | None = None, finished: bool = True) -> Path:
    """A plain Hugging Face run folder; with ``checkpoint``, only ``checkpoint-N/`` holds the state."""
    history = spiky_history() if history is None else history
    target = folder / f"checkpoint-{checkpoint}" if checkpoint else folder
    target.mkdir(parents=True, exist_ok=True)
    (target / "trainer_state.json").write_text(hf_trainer_state(history, max_steps=max_steps, finished=finished))
    return folder


def run_tiny(tmp_path: Path, assets: dict, *extra_plugins, training=None, guards=None, resume=None):
    """A real stabguard run of the tiny model, as tests/test_trainer.py drives it."""
    from stabguard.manager import Plugins
    from stabguard.runner import run

    plugins = Plugins.for_recipe()
    for i, plugin in enumerate(extra_plugins):
        plugins.register(plugin, name=f"test-plugin-{i}")
    recipe = tiny_recipe(assets, tmp_path / "out", training=training, guards=guards)
    return run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins, resume=resume)


def stabguard_history(**spiky: Any) -> list[dict]:
    """``spiky_history`` as a stabguard run logs it: pre/post-clip norms at clip 1, the skip counter."""
    lines, skipped = spiky_history(**spiky), 0
    for line in lines:
        norm = line["grad_norm"]
        skipped += not math.isfinite(norm)
        line.update({"stabguard/skipped_steps": skipped, "stabguard/grad_norm_pre_clip": norm})
        if math.isfinite(norm):
            line["stabguard/grad_norm_post_clip"] = min(norm, 1.0)
    return lines


def write_events(folder: Path, events: list[tuple[str, str, int, str, dict]]) -> Path:
    """``events.jsonl`` written through the real EventLog: (guard, kind, step, message, values) each."""
    from stabguard.events import EventLog

    log = EventLog(folder / "events.jsonl")
    for guard, kind, step, message, values in events:
        log.record(guard, kind, message, step=step, **values)
    log.close()
    return folder / "events.jsonl"


def PoisonSteps(*backwards: int) -> GradFault:  # noqa: N802 - reads as the fault it makes
    """A NaN in one LoRA gradient at the given backward passes (a real fault, before any guard)."""
    return GradFault(at=backwards, value=float("nan"), param="lora_A")
