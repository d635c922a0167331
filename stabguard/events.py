"""Append-only JSONL log of every guard decision and alert.

One JSON object per line, flushed as it is written, so a run that dies still leaves every decision
made before it on disk. Non-finite numbers are written as strings ("nan", "inf") to keep each line
strict JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Alert:
    """Something a person should look at; sent to every ``on_alert`` implementation."""

    guard: str
    message: str
    step: int | None = None
    values: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class EventLog:
    """Writes ``events.jsonl``; keeps the events of this run in memory too.

    ``path=None`` keeps events in memory only (non-main ranks, tests). ``on_alert`` is called for
    every event of kind ``"alert"``; the trainer points it at the ``on_alert`` hook. ``echo`` is called
    with every event after it is written (``stabguard run`` shows them on the console).
    """

    def __init__(self, path: str | Path | None = None, on_alert: Callable[[Alert], Any] | None = None,
                 echo: Callable[[dict], Any] | None = None):
        self.path = Path(path) if path is not None else None
        self.on_alert = on_alert
        self.echo = echo
        self.events: list[dict[str, Any]] = []
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Append: a resumed run adds to the decisions of the run it continues.
            self._file = self.path.open("a", encoding="utf-8")

    def record(self, guard: str, kind: str, message: str, *, step: int | None = None, **values: Any) -> dict:
        """Write one event. ``kind`` is e.g. "skip", "stop", "alert", "info", "finding"."""
        event = {"time": round(time.time(), 3), "step": step, "guard": guard, "kind": kind,
                 "message": message, "values": _jsonable(values)}
        self.events.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, ensure_ascii=False) + "\n")
            self._file.flush()
        if self.echo is not None:
            self.echo(event)
        if kind == "alert" and self.on_alert is not None:
            self.on_alert(Alert(guard=guard, message=message, step=step, values=event["values"]))
        return event

    def alert(self, guard: str, message: str, *, step: int | None = None, **values: Any) -> dict:
        """Record an event of kind "alert" (which also reaches the ``on_alert`` hook)."""
        return self.record(guard, "alert", message, step=step, **values)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Read an ``events.jsonl``; a half-written last line (a run killed mid-write) is ignored."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
