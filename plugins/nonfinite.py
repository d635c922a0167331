"""nonfinite: a NaN/Inf loss or gradient skips the optimizer step; too many in a row stop the run.

The Hugging Face Trainer's ``logging_nan_inf_filter`` only hides a NaN loss in the logged average while
the update still writes NaN into the weights. This guard drops the update instead, counts it, and stops
after ``max_consecutive`` skips in a row, because a skip must never hide a bug forever.

The loss is each rank's own, so ranks can disagree about a step; the core agrees on the most severe
verdict. The counters follow that agreed verdict (``on_step_end``), so every rank counts the same skips.
"""

from __future__ import annotations

import math

from pydantic import Field

from stabguard import GuardOptions, Verdict, hookimpl, metrics

NAME = "nonfinite"


class Options(GuardOptions):
    max_consecutive: int = Field(default=5, ge=1, description="skips in a row before the run stops")


def cause_of(values: dict[str, float]) -> str | None:
    """``"loss"``, ``"gradients"``, ``"loss and gradients"``, or None when both are finite."""
    bad = [label for key, label in (("loss", "loss"), ("grad_norm", "gradients")) if not math.isfinite(values[key])]
    return " and ".join(bad) or None


class NonFiniteGuard:
    def __init__(self, options: Options):
        self.options = options
        self.consecutive = 0  # agreed non-finite skips in a row
        self.total = 0
        self.overflows = 0
        self._overflow = False

    @hookimpl
    def pre_step(self, state, events):
        values = state.host()
        cause = cause_of(values)
        # fp16 AMP: inf gradients under a finite loss are the loss scaler's overflow; it lowers its scale
        # and tries again, so these skips do not count towards max_consecutive (the core's limit still does).
        self._overflow = cause == "gradients" and getattr(state, "loss_scaled", False)
        if cause is None:
            return None
        if self._overflow:
            events.record(NAME, "overflow", f"step {state.step}: fp16 gradient overflow; the loss scale backs off",
                          step=state.step, grad_norm=values["grad_norm"])
            return Verdict.skip("fp16 gradient overflow (loss scaler)", NAME)
        detail = f"non-finite {cause} (loss={values['loss']}, grad_norm={values['grad_norm']})"
        # cause: what a person reads after "because"; nonfinite: which values (hints and reports read these)
        events.record(NAME, "finding", f"step {state.step}: {detail}", step=state.step, cause=f"non-finite {cause}",
                      nonfinite=cause, loss=values["loss"], grad_norm=values["grad_norm"],
                      consecutive=self.consecutive + 1, limit=self.options.max_consecutive)
        if self.consecutive + 1 >= self.options.max_consecutive:
            return Verdict.stop(f"{self.consecutive + 1} consecutive non-finite steps; last: {detail}", NAME)
        return Verdict.skip(detail, NAME)

    @hookimpl
    def on_step_end(self, state):
        if self._overflow and state.verdict.decided_by(NAME):
            self.overflows += 1
        elif state.verdict.decided_by(NAME):
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0

    @hookimpl
    def on_log(self, logs):
        logs[metrics.NONFINITE_STEPS] = self.total
        if self.overflows:
            logs[metrics.FP16_OVERFLOWS] = self.overflows

    @hookimpl
    def state_dict(self):
        return {"consecutive": self.consecutive, "total": self.total}

    @hookimpl
    def load_state_dict(self, state):
        self.consecutive, self.total = state["consecutive"], state["total"]


@hookimpl
def register_guards(register):
    register(NAME, Options, NonFiniteGuard)
