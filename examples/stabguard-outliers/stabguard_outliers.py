"""outliers: quarantine the samples of a step whose loss is an outlier, and list them at the end.

A loss far above the recent ones (a robust z-score over a rolling window: median and MAD, so one
outlier does not widen the band it is judged by) skips the step; the step's sample ids are kept in a
quarantine list, recorded as a ``finding`` with ``cause``, ``z`` and ``threshold`` values, and listed in
one ``alert`` at the end of the run.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque

from pydantic import Field

from stabguard import GuardOptions, Verdict, hookimpl
from stabguard.verdict import Action

__version__ = "0.1.0"
NAME = "outliers"


class Options(GuardOptions):
    window: int = Field(default=50, ge=3, description="recent losses a step's loss is compared with")
    min_history: int = Field(default=5, ge=2, description="losses seen before outliers are judged")
    z: float = Field(default=6.0, gt=0, description="robust z-score (MAD) above which a loss is an outlier")


class OutlierGuard:
    def __init__(self, options: Options):
        self.options = options
        self.losses: deque[float] = deque(maxlen=options.window)
        self.quarantined: dict[int, list[str]] = {}  # step -> sample ids

    def z_score(self, loss: float) -> float:
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses) * 1.4826 or 1e-12
        return (loss - median) / mad

    @hookimpl
    def pre_step(self, state, events):
        loss = state.host()["loss"]
        if not math.isfinite(loss) or len(self.losses) < self.options.min_history:
            return None
        z = self.z_score(loss)
        if z <= self.options.z:
            return None
        self.quarantined[state.step] = list(state.samples)
        events.record(NAME, "finding", f"step {state.step}: loss {loss:.4g} is an outlier (z {z:.1f}); "
                      f"quarantined {', '.join(state.samples)}", step=state.step, cause="outlier loss",
                      loss=loss, z=z, threshold=self.options.z, samples=list(state.samples))
        return Verdict.skip(f"loss {loss:.4g} is an outlier (robust z {z:.1f} > {self.options.z:g})", NAME)

    @hookimpl
    def on_step_end(self, state):
        if state.verdict.action == Action.PROCEED and math.isfinite(loss := state.host()["loss"]):
            self.losses.append(loss)

    @hookimpl
    def on_train_end(self, events):
        if not self.quarantined:
            return
        ids = [sample for samples in self.quarantined.values() for sample in samples]
        events.alert(NAME, f"{len(ids)} sample(s) quarantined as loss outliers: {', '.join(ids)}",
                     samples=ids, steps=sorted(self.quarantined))
        print(f"stabguard: outliers: quarantined {', '.join(ids)}", file=sys.stderr, flush=True)

    @hookimpl
    def state_dict(self):
        return {"losses": list(self.losses), "quarantined": {str(k): v for k, v in self.quarantined.items()}}

    @hookimpl
    def load_state_dict(self, state):
        self.losses = deque(state["losses"], maxlen=self.options.window)
        self.quarantined = {int(k): v for k, v in state["quarantined"].items()}


@hookimpl
def register_guards(register):
    register(NAME, Options, OutlierGuard)
