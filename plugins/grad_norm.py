"""grad_norm: clip with the step's one shared norm, log pre/post-clip norms, alert on spikes.

``trainer_state.json`` keeps one grad-norm sample per logging step, so a spike between two log lines is
invisible there; this guard logs the largest pre-clip norm since the last line as well.
"""

from __future__ import annotations

import math

from pydantic import Field

from stabguard import GuardOptions, hookimpl
from stabguard.verdict import Action

NAME = "grad_norm"


class Options(GuardOptions):
    max_norm: float | None = Field(default=None, gt=0, description="clip to this; unset: training.max_grad_norm")
    alert_above: float | None = Field(default=10.0, gt=0, description="alert when the pre-clip norm exceeds this")
    alert_z: float | None = Field(default=4.0, gt=0, description="alert when the norm's z-score exceeds this")
    warmup_steps: int = Field(default=10, ge=1, description="steps of statistics before z-score alerts")


class RunningStats:
    """Welford mean/variance of the finite norms seen so far."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def z(self, x: float) -> float:
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
        return (x - self.mean) / std if std > 0 else 0.0


class GradNormGuard:
    def __init__(self, options: Options):
        self.options = options
        self.stats = RunningStats()
        self.pre_clip = self.post_clip = None
        self.max_since_log = -math.inf

    @hookimpl
    def pre_step(self, state, events):
        if self.options.max_norm is not None:
            state.clip_to(self.options.max_norm)
        norm = state.host()["grad_norm"]
        if not math.isfinite(norm):
            return None  # nonfinite's business; keep the statistics clean
        self.pre_clip = norm
        self.max_since_log = max(self.max_since_log, norm)
        self._alert(state.step, norm, events)
        self.stats.add(norm)
        return None

    def _alert(self, step: int, norm: float, events) -> None:
        opts = self.options
        if opts.alert_above is not None and norm > opts.alert_above:
            events.alert(NAME, f"grad norm {norm:.3g} above {opts.alert_above:g} at step {step}",
                         step=step, grad_norm=norm, threshold=opts.alert_above)
        elif opts.alert_z is not None and self.stats.count >= opts.warmup_steps:
            z = self.stats.z(norm)
            if z > opts.alert_z:
                events.alert(NAME, f"grad norm {norm:.3g} is {z:.1f} sigma above its running mean "
                             f"{self.stats.mean:.3g} at step {step}", step=step, grad_norm=norm, z=z)

    @hookimpl
    def on_step_end(self, state):
        if self.pre_clip is None or state.verdict.action != Action.PROCEED:
            self.post_clip = None
            return
        cap = state.max_norm if state.max_norm is not None else math.inf
        self.post_clip = min(self.pre_clip, cap)

    @hookimpl
    def on_log(self, logs):
        if self.pre_clip is not None:
            logs["stabguard/grad_norm_pre_clip"] = self.pre_clip
        if self.post_clip is not None:
            logs["stabguard/grad_norm_post_clip"] = self.post_clip
        if math.isfinite(self.max_since_log):
            logs["stabguard/grad_norm_max_since_log"] = self.max_since_log
        self.max_since_log = -math.inf

    @hookimpl
    def state_dict(self):
        return {"count": self.stats.count, "mean": self.stats.mean, "m2": self.stats.m2}

    @hookimpl
    def load_state_dict(self, state):
        self.stats.count, self.stats.mean, self.stats.m2 = state["count"], state["mean"], state["m2"]


@hookimpl
def register_guards(register):
    register(NAME, Options, GradNormGuard)
