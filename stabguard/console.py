"""What a run shows on the console: each guard decision as one line, as it happens.

``events.jsonl`` keeps everything; the console gets what a person watching the run acts on. A skip, a
stop, an alert, a rollback, an error, a finding or a dropped sample is one line each; a training log
line (``kind == "log"``, one per ``logging_steps``) is one compact line in place of the Trainer's log
dict; ``info`` events stay in the file unless a guard marks one with ``console=True``. A run of
decisions that differ only in their numbers (an alert every step) is cut after a few lines and
summed up as one "N more" line, so a flood cannot bury the rest.

The lines are written with ``tqdm.write``, which lifts the progress bar out of the way, to stderr
like every other ``stabguard:`` line.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from stabguard import metrics, seams

STYLES = {"skip": "yellow", "stop": "bold red", "error": "bold red", "alert": "magenta", "rollback": "cyan",
          "finding": "yellow", "drop": "yellow", "overflow": "yellow", "info": "blue", "remedy": "bold green",
          "diagnosis": "cyan"}

# Log keys worth a glance, in this order, with the label they get on the console.
LOG_KEYS = {"loss": "loss", "grad_norm": "grad", metrics.GRAD_NORM_MAX_SINCE_LOG: "max grad",
            "learning_rate": "lr", metrics.SKIPPED_STEPS: "skipped", metrics.ROLLBACKS: "rolled back",
            metrics.NONFINITE_STEPS: "nonfinite"}


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _prefix(event: dict) -> Text:
    step = event.get("step")
    return Text(f"step {step:>5} " if step is not None else " " * 11, style="dim")


def log_line(event: dict) -> Text | None:
    """``step 12  loss 6.951  grad 0.383  lr 0.002435``: the Trainer's log dict, cut to what matters."""
    values = event.get("values") or {}
    redundant = {"skipped": not values.get(metrics.SKIPPED_STEPS),
                 "rolled back": not values.get(metrics.ROLLBACKS),
                 "nonfinite": not values.get(metrics.NONFINITE_STEPS),
                 "max grad": values.get(metrics.GRAD_NORM_MAX_SINCE_LOG) == values.get("grad_norm")}
    parts = [f"{label} {_number(values[key])}" for key, label in LOG_KEYS.items()
             if key in values and not redundant.get(label)]
    if not parts:
        return None
    return _prefix(event).append("  ".join(parts), style="dim")


def render(event: dict) -> Text | None:
    """One console line for an event of ``events.jsonl``, or None for one that stays in the file."""
    kind = event.get("kind")
    if kind == "log":
        return log_line(event)
    if kind not in STYLES or (kind == "info" and not (event.get("values") or {}).get("console")):
        return None
    message = " ".join(str(event.get("message", "")).split())  # one line, whatever the message holds
    return _prefix(event).append(f"{event.get('guard')} {kind}", style=STYLES[kind]).append(f"  {message}")


def similarity_key(event: dict) -> tuple:
    """Events that differ only in numbers (steps, norms) count as the same kind of line."""
    return event.get("guard"), event.get("kind"), re.sub(r"[-+]?\d[\d.e+-]*|nan|inf", "#", str(event.get("message")))


class ConsoleEcho:
    """``EventLog(echo=ConsoleEcho())``: prints events as they are recorded, a flood cut to ``burst`` lines.

    :param burst: lines shown of one kind of line (see :func:`similarity_key`) before it is held back.
    :param every_s: while lines are held back, a "N more" line at most this often.
    """

    def __init__(self, write: Callable[[str], Any] | None = None, *, burst: int = 3, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write = write or _write_above_progress_bar
        self.burst, self.every_s, self.clock = burst, every_s, clock
        self.seen: dict[tuple, int] = {}
        self.held: dict[tuple, list[dict]] = {}
        self.last_summary = clock()
        self.console = Console(stderr=True, soft_wrap=True, highlight=False)

    def __call__(self, event: dict) -> None:
        line = render(event)
        if line is None:
            return
        key = similarity_key(event)
        self.seen[key] = self.seen.get(key, 0) + 1
        if event.get("kind") != "log" and self.seen[key] > self.burst:
            self.held.setdefault(key, []).append(event)
            if self.clock() - self.last_summary >= self.every_s:
                self.flush()
            return
        self._print(line)

    def flush(self) -> None:
        """Say how many lines were held back, one line per kind; call it when the run ends."""
        for events in self.held.values():
            first, last = events[0], events[-1]
            steps = f" (steps {first.get('step')}-{last.get('step')})" if first.get("step") is not None else ""
            self._print(_prefix(last).append(f"{first.get('guard')} {first.get('kind')}", style="dim")
                        .append(f"  {len(events)} more like the above{steps}; all in events.jsonl", style="dim"))
        self.held.clear()
        self.last_summary = self.clock()

    def _print(self, line: Text) -> None:
        with self.console.capture() as captured:
            self.console.print(line)
        self.write(captured.get().rstrip("\n"))


def _write_above_progress_bar(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def quiet_log_dicts(trainer) -> None:
    """Stop the Trainer printing each log dict; the compact ``log`` line above replaces it.

    transformers prints them from ``ProgressCallback.on_log`` (through the bar) or, with
    ``disable_tqdm = true``, from ``PrinterCallback``. The bar itself stays as the recipe set it.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.pop_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            seams.silence_progress_log(callback)


def run_event_log(path, plugins, *, rank: int):
    """``events.jsonl`` as every stabguard run writes it: one run id on every rank, each decision echoed on
    rank 0's console, alerts sent to the ``on_alert`` hook."""
    from stabguard.events import EventLog, shared_run_id

    return EventLog(path, on_alert=lambda alert: plugins.hook.on_alert(alert=alert),
                    echo=ConsoleEcho() if rank == 0 else None, run=shared_run_id(), rank=rank)
