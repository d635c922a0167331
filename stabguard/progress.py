"""Progress of long commands, on stderr: a rich bar on a terminal, plain periodic lines in a log.

Work that can run past a few seconds (boards generated, rows checked, answers generated) takes a
``progress(what, done, total)`` callback and knows nothing about display. The command passes a
:class:`Progress`, which draws one bar per ``what`` with counts and time left when stderr is a
terminal. Piped to a file or a CI log, a redrawn bar would be noise, so it prints a line every
``every_s`` seconds instead, and a last one when that ``what`` is done; work that finishes within
``every_s`` prints nothing, so quick commands keep quiet logs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


def duration(seconds: float) -> str:
    """``4.2s``, ``1m32s``, ``2h05m``: short enough for a progress line."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """Use as ``with Progress() as progress: work(progress=progress)``; ``last`` says how far it got."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.last: tuple[str, int, int] | None = None
        self._first: dict[str, tuple[float, int]] = {}  # what -> (time, done) of its first report
        self._printed: dict[str, float] = {}  # what -> time of its last plain line
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            self._bar = _rich_bar(self.stream)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()  # before any message about an error or an interrupt, so it is not drawn over

    def __call__(self, what: str, done: int, total: int) -> None:
        self.last = (what, done, total)
        now = self.clock()
        self._first.setdefault(what, (now, done))
        if self._bar is not None:
            self._draw(what, done, total)
        elif self._due(what, done, total, now):
            print(self._line(what, done, total, now), file=self.stream, flush=True)

    def _draw(self, what: str, done: int, total: int) -> None:
        if what not in self._tasks:
            self._tasks[what] = self._bar.add_task(what, total=total)
        self._bar.update(self._tasks[what], completed=done, total=total)

    def _due(self, what: str, done: int, total: int, now: float) -> bool:
        """Whether a plain line is due: every ``every_s`` seconds, and once at the end if there were others."""
        if done >= total:
            return self._printed.pop(what, None) is not None
        if now - self._printed.get(what, self._first[what][0]) < self.every_s:
            return False
        self._printed[what] = now
        return True

    def _line(self, what: str, done: int, total: int, now: float) -> str:
        start, done_then = self._first[what]
        line = f"stabguard: {what} {done}/{total} ({100 * done / max(total, 1):.0f}%), {duration(now - start)}"
        if done >= total or done == done_then or now <= start:
            return line
        rate = (done - done_then) / (now - start)
        return f"{line} elapsed, about {duration((total - done) / rate)} left"

    def interrupted(self, note: str) -> str:
        """The one line for Ctrl-C: how far the work got, then ``note`` (what was or was not written)."""
        if self.last is None:
            return f"stabguard: interrupted; {note}"
        what, done, total = self.last
        return f"stabguard: interrupted after {done}/{total} {what}; {note}"


def labelled(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    """``progress`` with ``label`` put before each ``what`` ("train" + "rows checked"), so the same
    work on two files shows as two bars."""
    if progress is None:
        return None
    return lambda what, done, total: progress(f"{label} {what}", done, total)


@contextmanager
def command_progress(note: str) -> Iterator[Progress]:
    """A :class:`Progress` for a command. Ctrl-C ends the command with one line on stderr, no traceback,
    and exit status 130 (128 + SIGINT, what shells report); ``note`` says what was left on disk."""
    progress = Progress()
    try:
        with progress:
            yield progress
    except KeyboardInterrupt:
        print(progress.interrupted(note), file=progress.stream, flush=True)
        raise SystemExit(130) from None


def _rich_bar(stream: TextIO):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("elapsed,"), TimeRemainingColumn(), TextColumn("left"))
    # transient: the command's own summary line replaces the bars once the work is done
    return RichProgress(*columns, console=Console(file=stream), transient=True)
