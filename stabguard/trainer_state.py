"""Read a training run from its output directory, as the Hugging Face Trainer and stabguard left it.

Works on any Hugging Face run (``trainer_state.json`` only) and uses stabguard's ``events.jsonl`` when
it is there. Two things make a plain ``json.load`` unreliable on a live run:

- the Trainer writes non-finite numbers as bare ``NaN``/``Infinity``/``-Infinity`` tokens (not strict
  JSON; Python's parser takes them, others do not, so they are read here explicitly);
- ``trainer_state.json`` is rewritten in place (not atomically) at every save, and a checkpoint folder
  may be deleted by ``save_total_limit`` while we read it: a failed read is retried, and a
  :class:`TrainerStateReader` falls back to its last good read.

During training the Trainer writes ``trainer_state.json`` only into each ``checkpoint-N/`` folder (the
top-level one appears at the end), so the newest of all of them is the run's current state.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabguard.events import events_of_run, read_events, run_ids

STATE_FILE = "trainer_state.json"
EVENTS_FILE = "events.jsonl"
_CONSTANTS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class TrainerStateError(ValueError):
    """A ``trainer_state.json`` that cannot be read (missing, or still not valid after retries)."""


@dataclass
class RunState:
    """What a run's output directory says about it.

    ``history`` holds the training log lines (entries with a loss or a grad norm) sorted by step;
    ``summary`` is the Trainer's final line (``train_runtime`` ...) once the run has ended.
    """

    output_dir: Path
    source: Path
    global_step: int
    max_steps: int | None
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    max_grad_norm: float | None = None
    step_times: list[tuple[int, float]] = field(default_factory=list)
    updated: float | None = None
    run_id: str | None = None  # the run of events.jsonl shown ("all": every run); None for a plain HF run
    runs: list[str] = field(default_factory=list)  # every run id in events.jsonl, oldest first

    @property
    def finished(self) -> bool:
        return self.summary is not None or bool(self.max_steps and self.global_step >= self.max_steps)

    def events_of(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") in kinds]

    def event_steps(self, *kinds: str) -> list[int]:
        return sorted({e["step"] for e in self.events_of(*kinds) if isinstance(e.get("step"), int)})

    def column(self, *keys: str) -> list[tuple[int, float]]:
        """(step, value) for every log line holding one of ``keys`` (the first one present wins)."""
        points = []
        for entry in self.history:
            key = next((k for k in keys if k in entry), None)
            value = as_float(entry.get(key)) if key else None
            if value is not None:
                points.append((int(entry.get("step", 0)), value))
        return points


def as_float(value: Any) -> float | None:
    """A logged number as a float: bare NaN tokens, events' "nan"/"inf" strings; None if not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_trainer_state(text: str, path: str | Path = STATE_FILE) -> dict[str, Any]:
    """Parse the Trainer's JSON dialect (bare NaN/Infinity tokens); errors name the file and position."""
    if not text.strip():
        raise TrainerStateError(f"{path}: empty (being rewritten?)")
    try:
        state = json.loads(text, parse_constant=_CONSTANTS.__getitem__)
    except json.JSONDecodeError as exc:
        raise TrainerStateError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise TrainerStateError(f"{path}: not a trainer state (expected an object with a log_history list)")
    return state


def find_trainer_state(output_dir: str | Path) -> Path | None:
    """The most recently written ``trainer_state.json``: the top-level one or a checkpoint's."""
    output_dir = Path(output_dir)
    if output_dir.is_file():
        return output_dir
    candidates = [output_dir / STATE_FILE, *output_dir.glob(f"checkpoint-*/{STATE_FILE}")]
    found = [(_mtime(p), p) for p in candidates]
    found = [(t, p) for t, p in found if t is not None]
    return max(found)[1] if found else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # absent, or removed by checkpoint rotation between glob and stat
        return None


def read_trainer_state(output_dir: str | Path, *, retries: int = 5, delay: float = 0.1) -> tuple[Path, dict]:
    """Find and parse the newest ``trainer_state.json``, retrying while it is being rewritten."""
    error: Exception | None = None
    for attempt in range(retries + 1):
        path = find_trainer_state(output_dir)
        if path is None:
            raise TrainerStateError(f"{output_dir}: no {STATE_FILE} (not in the folder, nor in any checkpoint-*/)")
        try:
            return path, parse_trainer_state(path.read_text(encoding="utf-8"), path)
        except (OSError, TrainerStateError) as exc:
            error = exc
            if attempt < retries:
                time.sleep(delay)
    raise TrainerStateError(f"{error} (after {retries + 1} tries)")


class TrainerStateReader:
    """Reads a run again and again (a monitor); a read that fails falls back to the last good one."""

    def __init__(self, output_dir: str | Path, *, retries: int = 3, delay: float = 0.1, run: str | None = None):
        self.output_dir = Path(output_dir)
        self.retries, self.delay, self.run = retries, delay, run
        self.last_good: RunState | None = None
        self.last_error: str | None = None

    def read(self) -> RunState:
        try:
            self.last_good = load_run(self.output_dir, retries=self.retries, delay=self.delay, run=self.run)
            self.last_error = None
        except TrainerStateError as exc:
            self.last_error = str(exc)
            if self.last_good is None:
                raise
        return self.last_good


def load_run(output_dir: str | Path, *, retries: int = 5, delay: float = 0.1, run: str | None = None) -> RunState:
    """Everything the monitor and the report need from an output directory.

    ``run``: which run of ``events.jsonl`` (a fresh run and each resume are runs): the latest by default,
    an id or its prefix, or "all". The log history is cut to the chosen run's steps too.
    Before the first checkpoint a stabguard run has only ``events.jsonl``: that is read alone then.
    """
    output_dir = Path(output_dir)
    every = read_run_events(output_dir)
    try:
        events = events_of_run(every, run)
    except ValueError as exc:
        raise TrainerStateError(f"{output_dir / EVENTS_FILE}: {exc}") from None
    if events and find_trainer_state(output_dir) is None:
        source, state = output_dir / EVENTS_FILE, {"log_history": []}
    else:
        source, state = read_trainer_state(output_dir, retries=retries, delay=delay)
    history, summary = split_log_history(state["log_history"])
    history = merge_logged_events(history, events)
    if run != "all":
        history, summary = steps_of_run(history, summary, events)
    steps = [e["step"] for e in history + events if isinstance(e.get("step"), int)]
    run = RunState(output_dir=output_dir, source=source, global_step=int(state.get("global_step") or max(steps, default=0)),
                   max_steps=state.get("max_steps") or None, history=history, summary=summary, events=events)
    clip = as_float(state["max_grad_norm"] if "max_grad_norm" in state else training_arg(output_dir, "max_grad_norm"))
    run.max_grad_norm = clip if clip and clip > 0 else None  # 0: the run did not clip
    run.step_times = step_times(output_dir, events)
    run.updated = max((t for _, t in run.step_times), default=_mtime(source))
    run.runs = run_ids(every)
    run.run_id = run if run == "all" else (str(events[0].get("run", "")) if events else None)
    return run


def steps_of_run(history: list[dict], summary: dict | None, events: list[dict]) -> tuple[list[dict], dict | None]:
    """The log lines after the step this run started from (a resumed run's history holds the earlier ones)."""
    start = next((e["values"]["start_step"] for e in events if "start_step" in (e.get("values") or {})), None)
    if not start:
        return history, summary
    if summary is not None and summary.get("step", 0) <= start:  # the end of an earlier run
        summary = None
    return [e for e in history if e.get("step", 0) > start], summary


def split_log_history(log_history: list[dict]) -> tuple[list[dict], dict | None]:
    """Training log lines (sorted by step) and the final summary line, leaving eval lines out."""
    history = [e for e in log_history if isinstance(e, dict) and ("loss" in e or "grad_norm" in e)]
    summary = next((e for e in reversed(log_history) if isinstance(e, dict) and "train_runtime" in e), None)
    return sorted(history, key=lambda e: e.get("step", 0)), summary


def merge_logged_events(history: list[dict], events: list[dict]) -> list[dict]:
    """Log lines the trainer also wrote to ``events.jsonl`` (kind "log") that no checkpoint holds yet.

    A checkpoint's ``trainer_state.json`` lags up to ``save_steps`` behind; events are written at once.
    """
    last = history[-1].get("step", 0) if history else 0
    newer = [{**e.get("values", {}), "step": e["step"]} for e in events
             if e.get("kind") == "log" and isinstance(e.get("step"), int) and e["step"] > last]
    return history + sorted(newer, key=lambda e: e["step"])


def read_run_events(output_dir: Path) -> list[dict[str, Any]]:
    """``events.jsonl`` of the run (a checkpoint folder's run is its parent); [] for a plain HF run."""
    for folder in (output_dir, output_dir.parent):
        path = folder / EVENTS_FILE
        if path.is_file():
            try:
                return read_events(path)
            except OSError:
                return []
        if not output_dir.name.startswith("checkpoint-"):
            break
    return []


def step_times(output_dir: Path, events: list[dict]) -> list[tuple[int, float]]:
    """(step, wall time) pairs, sorted by time: events with a step, and checkpoints' save times."""
    pairs = [(e["step"], float(e["time"])) for e in events if isinstance(e.get("step"), int) and e.get("time")]
    for path in output_dir.glob(f"checkpoint-*/{STATE_FILE}"):
        step, mtime = path.parent.name.removeprefix("checkpoint-"), _mtime(path)
        if step.isdigit() and mtime is not None:
            pairs.append((int(step), mtime))
    return sorted(pairs, key=lambda p: p[1])


# -- training_args.bin -------------------------------------------------------------------------------

class _Inert:
    """Stands in for every class a pickle names, so reading it runs no code from the file."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _Inert

    def persistent_load(self, pid: Any) -> None:
        return None


def training_arg(output_dir: Path, name: str) -> Any:
    """One field of the ``training_args.bin`` the Trainer saved (a torch zip of a pickle), or None.

    The pickle is read with every class replaced by an inert stand-in: no transformers import, and
    nothing in the file gets to run.
    """
    candidates = [output_dir / "training_args.bin", *sorted(output_dir.glob("checkpoint-*/training_args.bin"))]
    for path in candidates:
        try:
            with zipfile.ZipFile(path) as archive:
                data = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                obj = _InertUnpickler(io.BytesIO(archive.read(data))).load()
        except (OSError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError):
            continue
        state = obj.state if isinstance(obj, _Inert) else None
        if isinstance(state, dict) and name in state:
            return state[name]
    return None
