"""grad_norm: clip with the step's one shared norm, log pre/post-clip norms, alert on spikes.

``trainer_state.json`` keeps one grad-norm sample per logging step, so a spike between two log lines is
invisible there; this guard logs the largest pre-clip norm since the last line as well.

``adaptive = true`` clips ZClip-style (arXiv 2504.02507): an EMA of the norm's mean and variance, and a
clip at ``mean + adaptive_z * std``. Those statistics, the clip threshold and the logged norms stay on
the device as tensors; only alerts read host floats, from the step's one shared sync (``state.host()``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from stabguard import GuardOptions, hookimpl, metrics
from stabguard.verdict import Action

NAME = "grad_norm"


class Options(GuardOptions):
    max_norm: float | None = Field(default=None, gt=0, description="clip to this; unset: training.max_grad_norm")
    alert_above: float = Field(default=10.0, ge=0, description="alert when the pre-clip norm exceeds this; 0: off")
    alert_z: float = Field(default=4.0, ge=0, description="alert when the norm's z-score exceeds this; 0: off")
    warmup_steps: int = Field(default=10, ge=2, description="norms seen before z-scores (alerts, adaptive) count")
    adaptive: bool = Field(default=False, description="ZClip: clip at the EMA mean + adaptive_z * EMA std")
    adaptive_z: float = Field(default=2.5, gt=0, description="z-score above which adaptive clipping cuts")
    alpha: float = Field(default=0.97, gt=0, lt=1, description="EMA decay of the norm's mean and variance")


class EmaStats:
    """Mean and variance of a series: exact (Welford) over the first ``warmup`` values, then an EMA.

    Plain arithmetic only, so the same code keeps Python floats (alert statistics) or 0-dim device
    tensors (adaptive clipping, no host sync).
    """

    def __init__(self, alpha: float, warmup: int, count: int = 0, mean=0.0, var=0.0):
        self.alpha, self.warmup = alpha, warmup
        self.count, self.mean, self.var = count, mean, var

    @property
    def ready(self) -> bool:
        return self.count >= self.warmup

    def std(self):
        return self.var ** 0.5

    def add(self, x) -> None:
        self.count += 1
        delta = x - self.mean
        if self.count <= self.warmup:
            self.mean = self.mean + delta / self.count
            self.var = self.var + (delta * (x - self.mean) - self.var) / self.count
        else:
            step = (1 - self.alpha) * delta
            self.mean = self.mean + step
            self.var = self.alpha * (self.var + delta * step)

    def add_if_finite(self, x: torch.Tensor) -> None:
        """Device version of ``add``: a non-finite ``x`` leaves mean and variance as they were."""
        before = torch.as_tensor(self.mean, device=x.device), torch.as_tensor(self.var, device=x.device)
        self.add(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
        ok = torch.isfinite(x)
        self.mean, self.var = torch.where(ok, self.mean, before[0]), torch.where(ok, self.var, before[1])

    def state(self) -> dict:
        return {"count": self.count, "mean": float(self.mean), "var": float(self.var)}


class GradNormGuard:
    def __init__(self, options: Options):
        self.options = options
        self.alert_stats = EmaStats(options.alpha, options.warmup_steps)  # host floats
        self.clip_stats = EmaStats(options.alpha, options.warmup_steps)  # device tensors once used
        self.threshold = None  # this step's adaptive clip, a device tensor
        self.adaptive_clips = 0  # a device tensor once adaptive clipping has started
        self.pre_clip = self.post_clip = self.max_since_log = None
        self.alert_value = None  # this step's contribution to alert_stats, added if the step trains
        self.pending_alert: tuple[str, dict] | None = None  # recorded in on_step_end, with where it came from

    @hookimpl
    def pre_step(self, state, events):
        if self.options.max_norm is not None:
            state.clip_to(self.options.max_norm)
        norm = state.grad_norm.detach()
        self.pre_clip = norm
        finite = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        self.max_since_log = finite if self.max_since_log is None else torch.maximum(self.max_since_log, finite)
        self.threshold = None
        if self.options.adaptive and self.clip_stats.ready:
            self.threshold = self.clip_stats.mean + self.options.adaptive_z * self.clip_stats.std()
            self.adaptive_clips = self.adaptive_clips + (norm > self.threshold).long()
            state.clip_to(self.threshold)
        self.pending_alert = None
        if self.options.alert_above or self.options.alert_z:
            self._alert(state.step, state.host()["grad_norm"])
        if self.pending_alert is not None:
            state.ask_where()  # the alert says where the norm came from, once the core has worked it out
        return None

    def _alert(self, step: int, norm: float) -> None:
        self.alert_value = None
        if not math.isfinite(norm):
            return  # nonfinite's business; keep the statistics clean
        opts, stats = self.options, self.alert_stats
        z = (norm - stats.mean) / stats.std() if opts.alert_z and stats.ready and stats.var > 0 else 0.0
        if opts.alert_above and norm > opts.alert_above:
            self.pending_alert = (f"grad norm {norm:.3g} above {opts.alert_above:g} at step {step}",
                                  {"grad_norm": norm, "threshold": opts.alert_above, "cause": "grad norm above threshold"})
        elif opts.alert_z and z > opts.alert_z:
            self.pending_alert = (f"grad norm {norm:.3g} is {z:.1f} sigma above its running mean {stats.mean:.3g} at "
                                  f"step {step}", {"grad_norm": norm, "z": z, "threshold": opts.alert_z,
                                                   "cause": "grad norm z-score spike"})
        # A spike must not widen the statistics it is judged against (ZClip does the same): add it capped,
        # in on_step_end, and only if the step trains (a skipped step's norm is not the run's).
        spike = opts.alert_z and z > opts.alert_z
        self.alert_value = stats.mean + opts.alert_z * stats.std() if spike else norm

    @hookimpl
    def on_step_end(self, state, events):
        if self.pending_alert is not None:
            message, values = self.pending_alert
            if state.where is not None:
                message, values = f"{message}; where: {state.where.brief()}", {**values, "where": state.where.values()}
            events.alert(NAME, message, step=state.step, **values)
            self.pending_alert = None
        if self.pre_clip is None or state.verdict.action != Action.PROCEED:
            self.post_clip = None
            return
        if self.alert_value is not None:
            self.alert_stats.add(self.alert_value)
        self.post_clip = self.pre_clip if state.max_norm is None else self.pre_clip.clamp(max=state.max_norm)
        if self.options.adaptive:
            # ZClip feeds the clipped norm back, so one spike does not widen the band it is judged by.
            seen = self.pre_clip if self.threshold is None else self.pre_clip.clamp(max=self.threshold)
            self.clip_stats.add_if_finite(seen)

    @hookimpl
    def on_log(self, logs):
        named = {metrics.GRAD_NORM_PRE_CLIP: self.pre_clip, metrics.GRAD_NORM_POST_CLIP: self.post_clip,
                 metrics.GRAD_NORM_MAX_SINCE_LOG: self.max_since_log}
        if self.options.adaptive:
            named[metrics.GRAD_NORM_ADAPTIVE_THRESHOLD] = self.threshold
            named[metrics.GRAD_NORM_ADAPTIVE_CLIPS] = self.adaptive_clips
        named = {k: v for k, v in named.items() if v is not None}
        if self.pre_clip is not None:  # one transfer for all of them, on logging steps only
            device = self.pre_clip.device
            values = torch.stack([torch.as_tensor(v, device=device).float() for v in named.values()]).tolist()
            logs.update(zip(named, values))
        self.max_since_log = None

    @hookimpl
    def state_dict(self):
        return {"alert": self.alert_stats.state(), "clip": self.clip_stats.state(),
                "adaptive_clips": int(self.adaptive_clips)}

    @hookimpl
    def load_state_dict(self, state):
        self.alert_stats = EmaStats(self.options.alpha, self.options.warmup_steps, **state["alert"])
        self.clip_stats = EmaStats(self.options.alpha, self.options.warmup_steps, **state["clip"])
        self.adaptive_clips = state["adaptive_clips"]


@hookimpl
def register_guards(register):
    register(NAME, Options, GradNormGuard)
