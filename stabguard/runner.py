"""``stabguard run``: recipe -> plugins -> data -> model -> GuardTrainer -> outputs.

Everything the run decides goes to ``<output_dir>/events.jsonl``; the Trainer writes
``trainer_state.json`` and checkpoints beside it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stabguard.console import ConsoleEcho, quiet_log_dicts
from stabguard.events import EventLog
from stabguard.manager import Plugins
from stabguard.recipe import Recipe, RecipeError, load_recipe, plugin_lists


@dataclass
class RunResult:
    output_dir: Path
    stop_reason: str | None
    global_step: int
    skipped_steps: int
    trainer: object = None

    @property
    def ok(self) -> bool:
        return self.stop_reason is None


def say(message: str) -> None:
    print(f"stabguard: {message}", file=sys.stderr, flush=True)


def prepare(recipe_path: str | Path, plugins: Plugins | None = None) -> tuple[Recipe, Plugins]:
    """Validate the recipe against the plugins it names (built-ins, entry points, its own modules)."""
    if plugins is None:
        modules, block = plugin_lists(recipe_path)
        try:
            plugins = Plugins.for_recipe(modules, block)
        except ImportError as exc:
            raise RecipeError(recipe_path, [("plugins", str(exc))]) from None
    return load_recipe(recipe_path, plugins), plugins


def ensure_data(recipe: Recipe) -> None:
    """Generate the synthetic PCB set the recipe asks for when its train file does not exist yet."""
    train = Path(recipe.data.train)
    if train.exists() or not recipe.data.synth:
        return
    from stabguard.data.synth import synth_pcb

    options = recipe.data.synth.model_dump()
    say(f"generating synthetic PCB data in {train.parent} ({options})")
    synth_pcb(train.parent, **options)


def build_trainer(recipe: Recipe, plugins: Plugins, events: EventLog):
    """Load data and model, run the set-up hooks, and return a ready GuardTrainer."""
    from transformers import TrainingArguments

    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_model
    from stabguard.trainer import GuardTrainer

    ensure_data(recipe)
    bad = {"policy": recipe.data.bad_rows, "events": events}
    train = ConversationDataset(recipe.data.train, **bad)
    val = ConversationDataset(recipe.data.val, **bad) if recipe.data.val else None
    say(f"{len(train)} training conversations from {recipe.data.train}")
    model, processor = load_model(recipe.model, recipe.lora, recipe.quantization)
    plugins.hook.setup_model(model=model, processor=processor, recipe=recipe, events=events)
    args = TrainingArguments(**recipe.training_arguments())
    collator = ChatCollator(processor, max_length=recipe.data.max_length, truncation=recipe.data.truncation,
                            padding_side=recipe.data.padding_side, events=events)
    return GuardTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collator,
                        processing_class=processor, plugins=plugins, events=events,
                        max_consecutive_skips=recipe.max_consecutive_skips)


def run(recipe_path: str | Path, *, resume: str | bool | None = None, plugins: Plugins | None = None) -> RunResult:
    """Run a recipe end to end. A STOP verdict returns a result with ``stop_reason`` set."""
    recipe, plugins = prepare(recipe_path, plugins)
    enabled = plugins.enable_guards(recipe.guards)
    output_dir = Path(recipe.training["output_dir"])
    # Every rank decides the same; only the main process writes the log.
    path = output_dir / "events.jsonl" if os.environ.get("RANK", "0") == "0" else None
    echo = ConsoleEcho() if path is not None else None  # each decision as one line as it happens
    events = EventLog(path, on_alert=lambda alert: plugins.hook.on_alert(alert=alert), echo=echo)
    say(f"guards: {', '.join(enabled) or 'none'}; events -> {events.path}")
    events.record("core", "info", "run started", recipe=str(recipe_path), guards=enabled,
                  max_grad_norm=recipe.training_arguments().get("max_grad_norm", 1.0),
                  max_steps=recipe.training.get("max_steps"))
    try:
        plugins.hook.configure(recipe=recipe, events=events)
        trainer = build_trainer(recipe, plugins, events)
        quiet_log_dicts(trainer)  # its log dicts, printed through the progress bar, are echo's log lines now
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()
        for dataset in (trainer.train_dataset, trainer.eval_dataset):
            if getattr(dataset, "skipped", None):  # data.bad_rows = "skip": say what was left out
                say(dataset.summary())
        if trainer.stop_reason is None:
            trainer.save_model()
        return RunResult(output_dir, trainer.stop_reason, trainer.state.global_step, trainer.skipped_steps, trainer)
    except Exception as exc:
        # The reason goes into the log beside every decision before it; checkpoints already written stay.
        events.record("core", "error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        events.close()
        if echo is not None:
            echo.flush()
