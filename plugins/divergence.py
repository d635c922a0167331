"""divergence: a loss that rises, or stays far above where the run started, is not a spike: stop to heal.

A spike is an outlier in a window of recent losses; a run whose learning rate is too high from the start, or
that drifts upwards over many steps, has no outlier: its window is high throughout (docs/benchmarks.md's
lr-0.3 row). This guard compares the level now (the lowest accepted loss of the last ``window`` steps: every
one of them is above it, so one lucky batch cannot hide a divergence and one bad batch cannot fake one) with
the run's own reference: the lower of the first step's loss and the best level seen so far. A level above
``factor`` times that reference is a divergence: a healable STOP, which the core's recovery turns into a
rewind to an earlier verified state with a lower learning rate while its budget lasts (stabguard/recovery.py).

After a rollback or a rewind the window forgets the undone steps (``on_rollback``), so the restored
weights are judged on their own losses.
"""

from __future__ import annotations

import math
from collections import deque

from pydantic import Field

from stabguard import GuardOptions, Verdict, hookimpl
from stabguard.verdict import Action

NAME = "divergence"


class Options(GuardOptions):
    window: int = Field(default=16, ge=2, description="accepted losses whose lowest is the level now")
    factor: float = Field(default=2.0, gt=1, description="the level above this times the reference (the first "
                          "step's loss or the best level so far, the lower) is a divergence")


class DivergenceGuard:
    def __init__(self, options: Options):
        self.options = options
        self.losses: deque[tuple[int, float]] = deque(maxlen=options.window)  # (step, loss) of trained steps
        self.first: float | None = None
        self.best: float | None = None  # the lowest level so far

    @hookimpl
    def pre_step(self, state):
        loss = state.host()["loss"]
        if not math.isfinite(loss) or len(self.losses) + 1 < self.options.window or self.first is None:
            return None
        level = min([value for _, value in list(self.losses)[1:]] + [loss])
        reference = min(self.first, self.best if self.best is not None else self.first)
        if level <= self.options.factor * reference:
            return None
        return Verdict.stop(f"divergence: every loss of the last {self.options.window} steps is above {level:.4g}, "
                            f"{level / reference:.1f}x the run's reference {reference:.4g} (first step "
                            f"{self.first:.4g}, best level {_number(self.best)})", NAME, healable=True)

    @hookimpl
    def on_step_end(self, state):
        loss = state.host()["loss"]
        if state.verdict.action != Action.PROCEED or not math.isfinite(loss):
            return
        self.first = loss if self.first is None else self.first
        self.losses.append((state.step, loss))
        if len(self.losses) == self.options.window:
            level = min(value for _, value in self.losses)
            self.best = level if self.best is None else min(self.best, level)

    @hookimpl
    def on_rollback(self, state, restored_step):
        kept = [(step, loss) for step, loss in self.losses if step <= restored_step + 1]
        self.losses = deque(kept, maxlen=self.options.window)

    @hookimpl
    def state_dict(self):
        return {"losses": [list(pair) for pair in self.losses], "first": self.first, "best": self.best}

    @hookimpl
    def load_state_dict(self, state):
        self.losses = deque([(int(s), float(v)) for s, v in state["losses"]], maxlen=self.options.window)
        self.first, self.best = state["first"], state["best"]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@hookimpl
def register_guards(register):
    register(NAME, Options, DivergenceGuard)
