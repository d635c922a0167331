"""nonfinite: a NaN/Inf loss or gradient skips the optimizer step; too many in a row stop the run.

The Hugging Face Trainer's ``logging_nan_inf_filter`` only hides a NaN loss in the logged average while
the update still writes NaN into the weights. This guard drops the update instead, counts it, and stops
after ``max_consecutive`` skips in a row, because a skip must never hide a bug forever.
"""

from __future__ import annotations

import math

from pydantic import Field

from stabguard import GuardOptions, Verdict, hookimpl

NAME = "nonfinite"


class Options(GuardOptions):
    max_consecutive: int = Field(default=5, ge=1, description="skips in a row before the run stops")


class NonFiniteGuard:
    def __init__(self, options: Options):
        self.options = options
        self.consecutive = 0
        self.total = 0

    @hookimpl
    def pre_step(self, state):
        values = state.host()
        bad = [name for name in ("loss", "grad_norm") if not math.isfinite(values[name])]
        if not bad:
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.total += 1
        cause = " and ".join("loss" if b == "loss" else "gradients" for b in bad)
        detail = f"non-finite {cause} (loss={values['loss']}, grad_norm={values['grad_norm']})"
        if self.consecutive >= self.options.max_consecutive:
            return Verdict.stop(f"{self.consecutive} consecutive non-finite steps; last: {detail}", NAME)
        return Verdict.skip(detail, NAME)

    @hookimpl
    def on_log(self, logs):
        logs["stabguard/nonfinite_steps"] = self.total

    @hookimpl
    def state_dict(self):
        return {"consecutive": self.consecutive, "total": self.total}

    @hookimpl
    def load_state_dict(self, state):
        self.consecutive, self.total = state["consecutive"], state["total"]


@hookimpl
def register_guards(register):
    register(NAME, Options, NonFiniteGuard)
