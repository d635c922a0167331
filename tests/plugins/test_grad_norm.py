"""plugins/grad_norm.py: one shared norm, clipping, pre/post/peak metrics, alerts, ZClip-style clipping."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from support_faults import GradFault, StepProbe, run_guarded

from stabguard import EventLog, hookimpl
from stabguard.events import read_events
from stabguard.plugins.grad_norm import EmaStats, GradNormGuard, Options
from stabguard.trainer import StepState
from stabguard.verdict import Verdict

NO_ALERTS = {"alert_above": 0, "alert_z": 0}


class NoSync(StepState):
    """A StepState whose host() fails: the code under test must stay on the device."""

    def host(self):
        raise AssertionError("host sync")


def one_step(guard, events, step, norm, state_cls=StepState, max_norm=None, verdict=None):
    state = state_cls(step=step, grad_norm=torch.tensor(norm), loss=torch.tensor(1.0))
    if max_norm is not None:
        state.clip_to(max_norm)
    guard.pre_step(state=state, events=events)
    state.verdict = verdict or Verdict.proceed()
    guard.on_step_end(state=state, events=events)
    return state


@settings(deadline=None, max_examples=50)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40), st.integers(2, 10))
def test_ema_stats_exact_during_warmup_then_ema(values, warmup):
    alpha = 0.9
    stats, on_device = EmaStats(alpha, warmup), EmaStats(alpha, warmup)
    mean, var = None, None
    for i, x in enumerate(values, start=1):
        stats.add(x)
        on_device.add_if_finite(torch.tensor(x, dtype=torch.float64))
        if i <= warmup:
            mean, var = statistics.fmean(values[:i]), statistics.pvariance(values[:i])
        else:
            delta = x - mean
            mean, var = mean + (1 - alpha) * delta, alpha * (var + (1 - alpha) * delta * delta)
        assert stats.mean == pytest.approx(mean, rel=1e-9) and stats.var == pytest.approx(var, rel=1e-7, abs=1e-9)
    assert float(on_device.mean) == pytest.approx(stats.mean) and float(on_device.var) == pytest.approx(stats.var, abs=1e-9)


def test_device_stats_ignore_nonfinite_norms():
    stats = EmaStats(0.97, 2)
    for x in (1.0, 2.0, 1.5):
        stats.add_if_finite(torch.tensor(x))
    before = (stats.mean.clone(), stats.var.clone())
    for bad in (float("nan"), float("inf")):
        stats.add_if_finite(torch.tensor(bad))
    assert torch.equal(stats.mean, before[0]) and torch.equal(stats.var, before[1])


def test_clips_to_max_norm_through_the_shared_request():
    state = one_step(GradNormGuard(Options(max_norm=0.5, **NO_ALERTS)), EventLog(), 1, 3.0, state_cls=NoSync,
                     max_norm=1.0)
    assert state.max_norm == 0.5  # the smallest request wins; the core clips once


def test_alert_above_threshold():
    guard, events = GradNormGuard(Options(alert_above=10.0, alert_z=0)), EventLog()
    one_step(guard, events, 1, 9.0)
    one_step(guard, events, 2, 12.0)
    (alert,) = events.of_kind("alert")
    assert alert["step"] == 2 and alert["values"]["threshold"] == 10.0 and "12 above 10" in alert["message"]


def test_alert_on_z_score_only_after_warmup():
    guard, events = GradNormGuard(Options(alert_above=0, alert_z=4.0, warmup_steps=5)), EventLog()
    one_step(guard, events, 1, 1.0)
    one_step(guard, events, 2, 50.0)  # no statistics yet: no z-score alert
    for step, norm in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.0], start=3):
        one_step(guard, events, step, norm)
    assert events.of_kind("alert") == []
    one_step(guard, events, 9, 200.0)
    (alert,) = events.of_kind("alert")
    assert alert["step"] == 9 and alert["values"]["z"] > 4.0 and "sigma above its running mean" in alert["message"]


def test_nonfinite_norm_neither_alerts_nor_moves_the_statistics():
    guard, events = GradNormGuard(Options(alert_above=1.0)), EventLog()
    one_step(guard, events, 1, 0.5)
    one_step(guard, events, 2, float("nan"))
    assert events.events == [] and guard.alert_stats.count == 1


def test_adaptive_clipping_stays_on_the_device_and_cuts_a_spike():
    guard, events = GradNormGuard(Options(adaptive=True, warmup_steps=4, adaptive_z=2.5, **NO_ALERTS)), EventLog()
    for step, norm in enumerate([1.0, 1.2, 0.8, 1.0, 1.1], start=1):
        state = one_step(guard, events, step, norm, state_cls=NoSync)
    assert torch.is_tensor(guard.clip_stats.mean) and torch.is_tensor(state.max_norm)
    mean, std = float(guard.clip_stats.mean), float(guard.clip_stats.std())
    spike = one_step(guard, events, 6, 40.0, state_cls=NoSync, max_norm=100.0)
    assert float(spike.max_norm) == pytest.approx(mean + 2.5 * std)  # below the fixed 100
    assert float(guard.post_clip) == pytest.approx(mean + 2.5 * std)
    # ZClip feeds back the clipped norm: the band widens a little, not to the spike.
    assert float(guard.clip_stats.mean) < mean + 2.5 * std
    assert int(guard.adaptive_clips) == 1


def test_on_log_reports_pre_post_and_peak_since_last_log():
    guard, events = GradNormGuard(Options(**NO_ALERTS)), EventLog()
    one_step(guard, events, 1, 5.0, max_norm=1.0)
    one_step(guard, events, 2, 0.4, max_norm=1.0)
    logs = {}
    guard.on_log(logs=logs)
    assert logs == pytest.approx({"stabguard/grad_norm_pre_clip": 0.4, "stabguard/grad_norm_post_clip": 0.4,
                                  "stabguard/grad_norm_max_since_log": 5.0})
    one_step(guard, events, 3, 2.0, max_norm=1.0, verdict=Verdict.skip("test", "t"))
    logs = {}
    guard.on_log(logs=logs)
    assert logs == pytest.approx({"stabguard/grad_norm_pre_clip": 2.0, "stabguard/grad_norm_max_since_log": 2.0})


def test_state_round_trips_through_json():
    guard, events = GradNormGuard(Options(adaptive=True, warmup_steps=2)), EventLog()
    for step, norm in enumerate([1.0, 2.0, 1.5, 30.0], start=1):
        one_step(guard, events, step, norm)
    restored = GradNormGuard(Options(adaptive=True, warmup_steps=2))
    restored.load_state_dict(state=json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict() and restored.state_dict()["adaptive_clips"] == 1


def test_options_are_validated_by_name():
    with pytest.raises(ValidationError) as err:
        Options(alpha=1.0, adaptive_z=-1, colour="red")
    assert {e["loc"][0] for e in err.value.errors()} == {"alpha", "adaptive_z", "colour"}


# -- real faults in a real tiny run ----------------------------------------------------------------

class AppliedNorm:
    """The global norm of the gradients the optimizer actually steps with (an optimizer pre-hook)."""

    def __init__(self):
        self.norms, self.step = {}, None

    @hookimpl
    def pre_step(self, state):
        if self.step is None:
            inner = getattr(state.optimizer, "optimizer", state.optimizer)
            inner.register_step_pre_hook(self.measure)
        self.step = state.step

    def measure(self, optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms[self.step] = torch.stack([g.norm() for g in grads]).norm().item()


def logged(result) -> dict[int, dict]:
    history = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if "loss" in e}


def test_gradient_scaled_by_1e6_alerts_and_is_clipped_with_one_norm_pass(tmp_path, tiny_assets, monkeypatch):
    passes = []
    import stabguard.engine

    real = stabguard.engine.grad_norms
    monkeypatch.setattr(stabguard.engine, "grad_norms", lambda *a, **k: passes.append(1) or real(*a, **k))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: pytest.fail("second norm pass"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("second norm pass"))
    applied, probe = AppliedNorm(), StepProbe()
    result, _ = run_guarded(tmp_path, tiny_assets, GradFault(at={3}, scale=1e6), applied, probe,
                            training={"max_steps": 4, "max_grad_norm": 1.0})
    assert result.ok and probe.steps("PROCEED") == [1, 2, 3, 4] and len(passes) == 4
    logs = logged(result)
    assert logs[3]["stabguard/grad_norm_pre_clip"] == pytest.approx(probe.norms[3]) and probe.norms[3] > 1e4
    assert logs[3]["stabguard/grad_norm_post_clip"] == pytest.approx(1.0, rel=1e-4)
    assert applied.norms[3] == pytest.approx(1.0, rel=1e-4), "the optimizer must step with the clipped gradients"
    assert logs[3]["stabguard/grad_norm_max_since_log"] == logs[3]["stabguard/grad_norm_pre_clip"]
    alerts = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "alert"]
    assert [(e["guard"], e["step"]) for e in alerts] == [("grad_norm", 3)]
    assert all(torch.isfinite(p).all() for p in result.trainer.model.parameters())


def test_adaptive_clipping_in_a_real_run(tmp_path, tiny_assets):
    applied = AppliedNorm()
    result, _ = run_guarded(tmp_path, tiny_assets, GradFault(at={6}, scale=1e3), applied,
                            training={"max_steps": 6, "max_grad_norm": 100.0},
                            guards={"grad_norm": {"adaptive": True, "warmup_steps": 4, **NO_ALERTS}},
                            enabled=("grad_norm",))
    logs = logged(result)
    threshold = logs[6]["stabguard/grad_norm_adaptive_threshold"]
    assert "stabguard/grad_norm_adaptive_threshold" not in logs[4]  # still warming up
    assert logs[6]["stabguard/grad_norm_pre_clip"] > 10 * threshold and threshold < 100.0
    assert applied.norms[6] == pytest.approx(threshold, rel=1e-4)
    assert logs[6]["stabguard/grad_norm_adaptive_clips"] >= 1
