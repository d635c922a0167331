"""``stabguard run``: recipe -> plugins -> data -> model -> GuardTrainer -> outputs.

Everything the run decides goes to ``<output_dir>/events.jsonl``; the Trainer writes
``trainer_state.json`` and checkpoints beside it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import transformers

from stabguard.console import quiet_log_dicts, run_event_log
from stabguard.events import EventLog
from stabguard.manager import Plugins
from stabguard.recipe import Recipe, RecipeError, load_recipe, plugin_lists

EVENTS_FILE = "events.jsonl"


@dataclass
class RunResult:
    """What a run did. Dropped steps (no update applied) are of two kinds, counted apart: ``skipped_steps``
    (SKIP verdicts) and ``rollbacks`` (ROLLBACK verdicts: dropped, and the last verified state restored)."""

    output_dir: Path
    stop_reason: str | None
    global_step: int
    skipped_steps: int
    trainer: object = None
    run_id: str = ""
    error: str = ""  # a STOP made from a hook that raised: "crash" or "refused"
    rollbacks: int = 0

    @property
    def ok(self) -> bool:
        return self.stop_reason is None

    @property
    def dropped_steps(self) -> int:
        return self.skipped_steps + self.rollbacks


def say(message: str) -> None:
    print(f"stabguard: {message}", file=sys.stderr, flush=True)


def prepare(recipe_path: str | Path, plugins: Plugins | None = None) -> tuple[Recipe, Plugins]:
    """Validate the recipe against the plugins it names (built-ins, entry points, its own modules)."""
    if plugins is None:
        modules, block = plugin_lists(recipe_path)
        try:
            plugins = Plugins.for_recipe(modules, block, near=[Path(recipe_path).parent])
        except ImportError as exc:
            raise RecipeError(recipe_path, [("plugins", str(exc))]) from None
    return load_recipe(recipe_path, plugins), plugins


def announce_entry_points(plugins: Plugins, enabled: list[str]) -> list[dict]:
    """Say which installed packages joined this run through an entry point, and whether their guards are on."""
    found = []
    for info in plugins.entry_point_plugins():
        guards = {g.name: g.name in enabled for g in plugins.guards.values() if g.provided_by == info.name}
        shown = ", ".join(f"{g} {'on' if on else 'off (no [guards.' + g + '] in the recipe)'}" for g, on in guards.items())
        say(f"plugin {info.name} from {info.version} (entry point){'; guards: ' + shown if shown else ''}")
        found.append({"plugin": info.name, "package": info.version, "guards": guards})
    return found


def ensure_data(recipe: Recipe) -> None:
    """Generate the synthetic PCB set the recipe asks for when its train file does not exist yet."""
    train = Path(recipe.data.train)
    if train.exists() or not recipe.data.synth:
        return
    from stabguard.data.synth import synth_pcb

    options = recipe.data.synth.model_dump()
    say(f"generating synthetic PCB data in {train.parent} ({options})")
    synth_pcb(train.parent, **options)


def build_trainer(recipe: Recipe, plugins: Plugins, events: EventLog, args):
    """Load data and model, run the set-up hooks, and return a ready GuardTrainer."""
    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import ensure_model, load_model
    from stabguard.trainer import GuardTrainer

    # Assets a recipe builds on first use (synthetic data, the tiny model) are made before seeding: a
    # first run, which builds them, must train exactly like every later run, which reuses them.
    ensure_data(recipe)
    ensure_model(recipe.model)
    bad = {"policy": recipe.data.bad_rows, "events": events, "text_only_image": recipe.data.text_only_image}
    train = ConversationDataset(recipe.data.train, **bad)
    val = ConversationDataset(recipe.data.val, **bad) if recipe.data.val else None
    say(f"{len(train)} training conversations from {recipe.data.train}")
    # Everything random follows training.seed: LoRA's initialisation happens here, before the Trainer
    # seeds (again) for data order and dropout.
    transformers.set_seed(args.seed)
    model, processor = load_model(recipe.model, recipe.lora, recipe.quantization)
    plugins.hook.setup_model(model=model, processor=processor, recipe=recipe, events=events)
    collator = ChatCollator(processor, max_length=recipe.data.max_length, truncation=recipe.data.truncation,
                            padding_side=recipe.data.padding_side, events=events)
    return GuardTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collator,
                        processing_class=processor, plugins=plugins, events=events,
                        max_consecutive_skips=recipe.max_consecutive_skips,
                        snapshot_every=recipe.snapshots.every, snapshot_offload=recipe.snapshots.offload,
                        snapshot_ring=recipe.snapshots.ring, snapshot_ring_every=recipe.snapshots.ring_every,
                        recovery=recipe.recovery)


def run_arguments(recipe: Recipe) -> dict:
    """The recipe's training arguments. Off a terminal (a log file, CI) no progress bars: their
    carriage-return updates would share lines with the step lines. ``disable_tqdm`` in the recipe wins."""
    args = recipe.training_arguments()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" and the like
        args.setdefault("disable_tqdm", True)
    return args


def run(recipe_path: str | Path, *, resume: str | bool | None = None, plugins: Plugins | None = None,
        heal: bool = False) -> RunResult:
    """Run a recipe end to end. A STOP verdict returns a result with ``stop_reason`` set.

    :param resume: a checkpoint folder; ``"last"`` (or True): the newest complete one in ``output_dir``;
        ``"auto"``: that one when there is one, else a fresh start (for ``torchrun --max-restarts``).
    :param heal: resuming from a STOP's checkpoint, apply the recovery's next remedy at the first step.
    """
    join_restarted_job()
    recipe, plugins = prepare(recipe_path, plugins)
    enabled = plugins.enable_guards(recipe.guards)
    output_dir = Path(recipe.training["output_dir"])
    args = transformers.TrainingArguments(**run_arguments(recipe))  # under torchrun: joins the group
    events = run_event_log(output_dir / EVENTS_FILE, plugins, rank=args.process_index)
    say(f"run {events.run}; guards: {', '.join(enabled) or 'none'}; events -> {events.path}")
    installed = announce_entry_points(plugins, enabled)
    events.record("core", "info", "run started", recipe=str(recipe_path), guards=enabled, resume=str(resume),
                  entry_points=installed,
                  max_grad_norm=args.max_grad_norm, max_steps=args.max_steps, seed=args.seed,
                  world_size=args.world_size)
    try:
        plugins.hook.configure(recipe=recipe, events=events)
        trainer = build_trainer(recipe, plugins, events, args)
        trainer.guarded.heal_on_resume = heal
        quiet_log_dicts(trainer)  # its log dicts, printed through the progress bar, are echo's log lines now
        trainer.resume_verified = resolve_resume(output_dir, resume, events)  # said once, here
        trainer.train(resume_from_checkpoint=trainer.resume_verified)
        trainer.save_state()
        for dataset in (trainer.train_dataset, trainer.eval_dataset):
            if getattr(dataset, "skipped", None):  # data.bad_rows = "skip": say what was left out
                say(dataset.summary())
        verdict = trainer.stop_verdict or _unapplied_failure(trainer)
        if verdict is None:
            trainer.save_model()
        return RunResult(output_dir, trainer.stop_reason or (verdict and verdict.reason), trainer.state.global_step,
                         trainer.skipped_steps, trainer, events.run, verdict.error if verdict else "",
                         trainer.guarded.rollbacks)
    except Exception as exc:
        # The reason goes into the log beside every decision before it; checkpoints already written stay.
        events.record("core", "error", f"{type(exc).__name__}: {exception_text(exc)}")
        raise
    finally:
        events.close()
        if events.echo is not None:
            events.echo.flush()


def join_restarted_job() -> None:
    """Under ``torchrun --max-restarts``, a restarted attempt joins its process group under a prefix of its own.

    torchrun's agent keeps one store for the whole job, and it still holds the keys the killed attempt's
    ranks wrote (gloo: each rank's address), so a restarted rank read a dead address and the restart failed
    ("Connection refused"; torch 2.14.1). The first attempt is left to accelerate, as always.
    """
    import datetime
    import os

    import torch
    import torch.distributed as dist

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or "RANK" not in os.environ or not dist.is_available() or dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=datetime.timedelta(minutes=10))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, store=dist.PrefixStore(f"stabguard/attempt_{attempt}", store), rank=rank,
                            world_size=world)
    say(f"restart {attempt} of this torchrun job: rank {rank} joined")


def exception_text(exc: Exception) -> str:
    """A data-loader worker's exception arrives with the worker's traceback in its message: keep its own."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    return text.rsplit(f"{type(exc).__name__}: ", 1)[-1].strip()


def _unapplied_failure(trainer):
    """A hook that raised after the last step's agreement: no step was left to stop, but the run failed."""
    return next((v for v in trainer.guarded.held if v.error), None)


def resolve_resume(output_dir: Path, resume: str | bool | None, events: EventLog | None = None) -> str | None:
    """The checkpoint to resume from, verified against its manifest (``stabguard.checkpoints``): ``"last"``
    (or True) the newest that verifies, ``"auto"`` the same or None (a fresh start); anything else is a
    folder, which must verify. What was passed over, and why, is said and logged."""
    from stabguard.checkpoints import choose_resume

    if not resume:
        return None
    chosen, notes = choose_resume(output_dir, "last" if resume is True else str(resume))
    for note in notes:
        say(note)
        if events is not None:  # said on the console already: kept in the file only
            events.record("core", "info", f"--resume: {note}")
    return str(chosen) if chosen else None
