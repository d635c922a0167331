"""Append-only JSONL log of every guard decision and alert.

One JSON object per line, written with a single ``write`` to a file opened for appending, so a run that
dies (even by SIGKILL) leaves every complete line on disk, and ranks sharing the file do not interleave
their lines. Non-finite numbers are written as strings ("nan", "inf") to keep each line strict JSON.

Every line carries ``run`` (a fresh id for each run; a resumed run is a new run) and ``rank``. Readers
follow the latest run by default (``events_of_run``). Rank 0 writes every event; other ranks write only
what they alone saw (kinds in ``RANK_LOCAL_KINDS``): the decisions are agreed, so rank 0's copy says it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RANK_LOCAL_KINDS = frozenset({"finding", "error"})


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


def shared_run_id() -> str:
    """A new run id, the same on every rank (rank 0's)."""
    import torch.distributed as dist

    run_id = [new_run_id()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def new_run_id() -> str:
    """Sortable by start time, unique enough for one output folder: ``20261130-201500-3f9a``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class EventLog:
    """Writes ``events.jsonl``; keeps the events of this run in memory too.

    ``path=None`` keeps events in memory only (tests). ``on_alert`` is called once for every event of
    kind ``"alert"`` on rank 0; the trainer points it at the ``on_alert`` hook. A notifier that raises
    becomes an ``error`` event: an alert sink must not end a run. ``echo`` is called with every event
    after it is written (``stabguard run`` shows them on the console).
    """

    def __init__(self, path: str | Path | None = None, on_alert: Callable[[Alert], Any] | None = None,
                 echo: Callable[[dict], Any] | None = None, *, run: str | None = None, rank: int = 0):
        self.path = Path(path) if path is not None else None
        self.on_alert, self.echo = on_alert, echo
        self.run, self.rank = run or new_run_id(), rank
        self.events: list[dict[str, Any]] = []
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Append: a resumed run adds to the decisions of the run it continues (under a new run id).
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if rank == 0 and _ends_torn(self.path):  # a killed writer's half line stays alone on its line
                os.write(self._fd, b"\n")

    def record(self, guard: str, kind: str, message: str, *, step: int | None = None, **values: Any) -> dict:
        """Write one event. ``kind`` is e.g. "skip", "rollback", "stop", "alert", "info", "finding", "error"."""
        event = {"time": round(time.time(), 3), "run": self.run, "rank": self.rank, "step": step, "guard": guard,
                 "kind": kind, "message": message, "values": _jsonable(values)}
        self.events.append(event)
        if self._fd is not None and (self.rank == 0 or kind in RANK_LOCAL_KINDS):
            os.write(self._fd, (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8"))
        if self.echo is not None:
            self.echo(event)
        if kind == "alert" and self.on_alert is not None and self.rank == 0:
            self._notify(Alert(guard=guard, message=message, step=step, values=event["values"]))
        return event

    def __getstate__(self) -> dict:
        # A data-loader worker started with "spawn" gets a copy: it opens the file again, for appending.
        return {**self.__dict__, "_fd": None, "events": [], "echo": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _notify(self, alert: Alert) -> None:
        try:
            self.on_alert(alert)
        except Exception as exc:  # noqa: BLE001 - any notifier failure is reported, never fatal
            who = getattr(exc, "plugin", "on_alert")
            self.record(str(who), "error", f"an on_alert notifier failed; training goes on: {exc}",
                        step=alert.step, alert=alert.message)

    def alert(self, guard: str, message: str, *, step: int | None = None, **values: Any) -> dict:
        """Record an event of kind "alert" (which also reaches the ``on_alert`` hook)."""
        return self.record(guard, "alert", message, step=step, **values)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _ends_torn(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Read an ``events.jsonl``; a half-written last line (a run killed mid-write) is ignored."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def run_ids(events: list[dict[str, Any]]) -> list[str]:
    """The runs in a log, oldest first (lines written before run ids existed count as run "")."""
    return list(dict.fromkeys(str(e.get("run", "")) for e in events))


def events_of_run(events: list[dict[str, Any]], run: str | None = None) -> list[dict[str, Any]]:
    """The events of one run: the latest by default, ``"all"`` for every run, or a run id (or its prefix)."""
    if run == "all" or not events:
        return events
    ids = run_ids(events)
    if run is None:
        chosen = ids[-1]
    else:
        matches = [i for i in ids if i.startswith(run)]
        if len(matches) != 1:
            known = ", ".join(i or '""' for i in ids)
            raise ValueError(f"run {run!r} {'is ambiguous' if matches else 'not found'}; runs in this log: {known}")
        chosen = matches[0]
    return [e for e in events if str(e.get("run", "")) == chosen]
