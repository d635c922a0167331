"""A written diagnosis of a run: what went wrong, where (step ranges), how often, and why (events).

For example: "grad norm > 10 at steps 120–135 (max 48 at step 127)", "3 steps skipped (non-finite
gradients) at steps 300–302", "loss smooth after step 302: 2.1 → 1.4". The thresholds are the source
note's: a pre-clip grad norm below 1 is fine, above 10 is trouble. Each finding has a severity; a run
is unhealthy ("trouble") only for what still matters now: a stop, NaN updates that no guard skipped,
or a grad norm above the alert line at the latest log.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from statistics import median

from stabguard import metrics
from stabguard.trainer_state import RunState, as_float

ALERT_ABOVE = 10.0
FINE_BELOW = 1.0
SEVERITIES = ("ok", "warn", "trouble")
PRE_CLIP_KEYS = ("grad_norm", metrics.GRAD_NORM_PRE_CLIP)


@dataclass(frozen=True)
class Finding:
    """One line of the diagnosis. ``topic``: stop, nonfinite, grad_norm, grad_norm_high, skip, alert,
    rollback, loss_spike, loss_zero, loss, lr."""

    severity: str  # "ok" | "warn" | "trouble"
    topic: str
    text: str
    steps: tuple[int, ...] = ()


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)

    @property
    def health(self) -> str:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="ok")

    def text(self) -> str:
        return "\n".join(f"[{f.severity}] {f.text}" for f in self.findings)


def dropped_text(skipped: int, rollbacks: int) -> str:
    """One count of the steps that applied no update, with each kind named: "2 dropped: 1 skipped, 1 rolled back"."""
    if not skipped + rollbacks:
        return "none dropped"
    kinds = [f"{skipped} skipped"] * bool(skipped) + [f"{rollbacks} rolled back"] * bool(rollbacks)
    return f"{skipped + rollbacks} dropped: {', '.join(kinds)}"


def dropped_counts(run: RunState) -> tuple[int, int]:
    """(skipped, rolled back) steps of a run: from its events, else from the last logged counters."""
    if run.events:
        return len(run.events_of("skip")), len(run.events_of("rollback"))
    return _last_count(run, metrics.SKIPPED_STEPS), _last_count(run, metrics.ROLLBACKS)


def _last_count(run: RunState, key: str) -> int:
    return int(max((v for _, v in run.column(key) if math.isfinite(v)), default=0))


def where_events(run: RunState) -> list[dict]:
    """The events that say where their step broke (skips, rollbacks, stops and alerts with ``where``)."""
    return [e for e in run.events if isinstance((e.get("values") or {}).get("where"), dict)]


@dataclass
class WhereGrid:
    """The anomalous steps side by side: ``shares[r][c]`` is module ``rows[r]``'s share of the squared grad
    norm at step ``columns[c]`` (0 when not among that step's top modules); ``nonfinite[r][c]`` counts its
    gradient tensors holding NaN/Inf there."""

    columns: list[tuple[int, str]]  # (step, what happened: "skip", "rollback", "alert", "stop")
    rows: list[str]  # "module (part)"; a module with NaN/Inf gradients is named without a part
    shares: list[list[float]]
    nonfinite: list[list[int]]


def where_grid(run: RunState, top: int = 8) -> WhereGrid | None:
    """The modules behind the anomalous steps (one column per step, whichever of its events said where),
    the ``top`` of them by their largest share; modules with NaN/Inf gradients first. None when no event
    says where."""
    by_step: dict[int, tuple[str, dict]] = {}
    for event in where_events(run):
        step = event.get("step")
        if isinstance(step, int) and step not in by_step:
            by_step[step] = event.get("kind", ""), event["values"]["where"]
    if not by_step:
        return None
    columns = sorted(by_step)
    share: dict[str, dict[int, float]] = {}
    bad: dict[str, dict[int, int]] = {}
    for step in columns:
        where = by_step[step][1]
        for module, part, value in where.get("modules", []):
            label = module if part == "weight" else f"{module} ({part})"
            share.setdefault(label, {})[step] = float(value)
        for module, count in (where.get("nonfinite") or {}).items():
            bad.setdefault(module, {})[step] = int(count)
    ranked = sorted(set(share) | set(bad), key=lambda m: (-sum(bad.get(m, {}).values()),
                                                          -max(share.get(m, {0: 0.0}).values())))[:top]
    return WhereGrid(columns=[(s, by_step[s][0]) for s in columns], rows=ranked,
                     shares=[[share.get(m, {}).get(s, 0.0) for s in columns] for m in ranked],
                     nonfinite=[[bad.get(m, {}).get(s, 0) for s in columns] for m in ranked])


# -- the run's series ------------------------------------------------------------------------------

def losses(run: RunState) -> list[tuple[int, float]]:
    """The logged loss; a 0.0 logged beside a NaN grad norm is the Trainer's NaN symptom, read as NaN."""
    norms = dict(run.column(*PRE_CLIP_KEYS))
    return [(s, math.nan if v == 0.0 and not math.isfinite(norms.get(s, 0.0)) else v)
            for s, v in run.column("loss")]


def grad_norms(run: RunState) -> list[tuple[int, float]]:
    """Pre-clip grad norm at each log line (the Trainer's own value first; stabguard's is the same)."""
    return run.column(*PRE_CLIP_KEYS)


def peak_grad_norms(run: RunState) -> list[tuple[int, float]]:
    """The largest pre-clip norm since the previous log line where stabguard logged it, else the sample."""
    peaks = dict(run.column(metrics.GRAD_NORM_MAX_SINCE_LOG))
    return [(s, max(v, peaks[s]) if s in peaks and math.isfinite(v) else v) for s, v in grad_norms(run)]


def clip_value(run: RunState) -> float | None:
    """The clip the run applied: ``max_grad_norm`` from its state/arguments, unless the post-clip norms
    show one fixed, different clip (a guard's ``max_norm``); adaptive clips vary, and draw no line."""
    pre = dict(run.column(metrics.GRAD_NORM_PRE_CLIP))
    seen = [post for s, post in run.column(metrics.GRAD_NORM_POST_CLIP)
            if s in pre and math.isfinite(post) and post < pre[s] * (1 - 1e-6)]
    fixed = seen and max(seen) <= min(seen) * (1 + 1e-4)
    args_clip = run.max_grad_norm
    if not fixed or (args_clip is not None and math.isclose(min(seen), args_clip, rel_tol=1e-4)):
        return args_clip  # a logged float32 norm is a few ulps off the configured clip
    return min(seen)


def alert_threshold(run: RunState, default: float = ALERT_ABOVE) -> float:
    """The grad_norm guard's alert line when its alerts say it, else the note's 10."""
    for event in run.events_of("alert"):
        threshold = as_float((event.get("values") or {}).get("threshold"))
        if event.get("guard") == "grad_norm" and threshold is not None:
            return threshold
    return default


# -- formatting ------------------------------------------------------------------------------------

def step_ranges(steps: list[int], gap: int = 1, limit: int = 4) -> str:
    """``[3, 120, 130, 135]`` with ``gap=10`` (the logging interval) -> "steps 3, 120–135"."""
    groups: list[list[int]] = []
    for step in sorted(set(steps)):
        if groups and step - groups[-1][-1] <= gap:
            groups[-1].append(step)
        else:
            groups.append([step])
    parts = [str(g[0]) if len(g) == 1 else f"{g[0]}–{g[-1]}" for g in groups]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    word = "step" if len(groups) == 1 and len(groups[0]) == 1 else "steps"
    return f"{word} {', '.join(parts[:limit])}{more}"


def log_gap(run: RunState) -> int:
    """The logging interval, so that steps 120, 130, 135 read as one stretch."""
    steps = [int(e.get("step", 0)) for e in run.history]
    diffs = [b - a for a, b in zip(steps, steps[1:]) if b > a]
    return int(median(diffs)) if diffs else 1


def num(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def brief(message: str) -> str:
    """An event's message with long floats shortened: "loss=7.116981506347656" -> "loss=7.117"."""
    return re.sub(r"\d+\.\d{5,}(e-?\d+)?", lambda m: f"{float(m.group()):.4g}", message)


# -- findings --------------------------------------------------------------------------------------

def stop_findings(run: RunState) -> list[Finding]:
    found = []
    for e in run.events_of("stop"):
        checkpoint = str((e.get("values") or {}).get("checkpoint", "")).rstrip("/").rsplit("/", 1)[-1]
        saved = f"; last good state in {checkpoint}" if checkpoint else ""
        found.append(Finding("trouble", "stop", f"{brief(e.get('message', 'run stopped'))}{saved}",
                             tuple(s for s in (e.get("step"),) if isinstance(s, int))))
    return found


def nonfinite_finding(run: RunState) -> Finding | None:
    bad_loss = [s for s, v in run.column("loss") if not math.isfinite(v)]
    bad_norm = [s for s, v in grad_norms(run) if not math.isfinite(v)]
    bad = sorted(set(bad_loss) | set(bad_norm))
    if not bad:
        return None
    what = " and ".join(n for n, steps in (("loss", bad_loss), ("grad norm", bad_norm)) if steps)
    where = step_ranges(bad, log_gap(run))
    zeros = any(v == 0.0 for s, v in run.column("loss") if s in bad_norm)
    zero = " (loss logged as 0.0 there)" if zeros else ""
    unskipped = sorted(set(bad) - set(run.event_steps("skip", "stop", "rollback")))
    if not unskipped:
        return Finding("warn", "nonfinite", f"non-finite {what} at {where}, skipped{zero}", tuple(bad))
    return Finding("trouble", "nonfinite", f"non-finite {what} at {where}{zero}; no skip recorded: the update may have "
                   "written NaN into the weights (unless fp16 loss scaling skipped it)", tuple(bad))


def grad_norm_findings(run: RunState) -> list[Finding]:
    every = peak_grad_norms(run)
    norms = [(s, v) for s, v in every if math.isfinite(v)]
    if not norms:
        return []
    alert, gap = alert_threshold(run), log_gap(run)
    high = [(s, v) for s, v in norms if v > alert]
    mid = [s for s, v in norms if FINE_BELOW < v <= alert]
    top_step, top = max(norms, key=lambda p: p[1])
    found = []
    if high:
        sev = "trouble" if high[-1][0] == every[-1][0] else "warn"  # still high at the latest log line
        found.append(Finding(sev, "grad_norm_high", f"grad norm > {alert:g} at {step_ranges([s for s, _ in high], gap)} "
                             f"(max {num(top)} at step {top_step})", tuple(s for s, _ in high)))
    if mid:
        found.append(Finding("warn", "grad_norm", f"grad norm between {FINE_BELOW:g} and {alert:g} at {len(mid)} of "
                             f"{len(norms)} log lines ({step_ranges(mid, gap)})", tuple(mid)))
    if not high and not mid:
        found.append(Finding("ok", "grad_norm", f"grad norm below {FINE_BELOW:g} throughout (max {num(top)} at step {top_step})"))
    return found


def skip_cause(event: dict) -> str:
    """Why a step was skipped, from its event: the verdict's ``reason`` without the guards' names that lead it
    and the numbers in brackets ("nonfinite: non-finite gradients (loss=…)" -> "non-finite gradients")."""
    values = event.get("values") or {}
    reason = str(values.get("reason") or event.get("message", "")).removeprefix(f"step {event.get('step')} skipped: ")
    lead = f"{event.get('guard')}: "
    cause = reason.removeprefix(lead).split(";")[0]
    return brief(re.sub(r"\s*\(.*\)$", "", cause).strip()) or "no reason given"


def stated_causes(run: RunState) -> dict[tuple[str, int], str]:
    """``(guard, step) -> cause`` from the events where a guard said why (its ``cause`` value)."""
    return {(e.get("guard"), e.get("step")): str(e["values"]["cause"]) for e in run.events
            if isinstance(e.get("values"), dict) and e["values"].get("cause") and e.get("step") is not None}


def skip_findings(run: RunState) -> list[Finding]:
    """Skips grouped by cause; causes that differ only in their numbers form one group ("e.g. …")."""
    skips = run.events_of("skip")
    if not skips:
        counted = _last_count(run, metrics.SKIPPED_STEPS)
        return [Finding("warn", "skip", f"{counted} step{'s' if counted > 1 else ''} skipped (see events.jsonl)")] if counted else []
    causes_at = stated_causes(run)
    groups: dict[str, tuple[list[int], set[str]]] = {}
    for e in skips:
        guard = str(e.get("guard", "")).split(",")[0]
        cause = causes_at.get((guard, e.get("step"))) or skip_cause(e)
        steps, causes = groups.setdefault(re.sub(r"[\d.]+", "#", cause), ([], set()))
        steps.append(e.get("step") or 0)
        causes.add(cause)
    return [Finding("warn", "skip", f"{len(steps)} step{'s' if len(steps) > 1 else ''} skipped "
                    f"({'e.g. ' if len(causes) > 1 else ''}{sorted(causes)[-1]}) at {step_ranges(steps)}", tuple(steps))
            for steps, causes in groups.values()]


def event_findings(run: RunState, kind: str, noun: str) -> list[Finding]:
    """Alerts (or rollbacks) grouped by guard, with the latest message."""
    by_guard: dict[str, list[dict]] = {}
    for e in run.events_of(kind):
        by_guard.setdefault(e.get("guard") or "?", []).append(e)
    found = []
    for guard, events in by_guard.items():
        steps = [e["step"] for e in events if isinstance(e.get("step"), int)]
        where = f" at {step_ranges(steps)}" if steps else ""
        plural = "s" if len(events) > 1 else ""
        found.append(Finding("warn", kind, f"{len(events)} {noun}{plural} from {guard}{where}; last: {brief(events[-1].get('message', ''))}",
                             tuple(steps)))
    return found


def loss_spikes(points: list[tuple[int, float]], ratio: float = 1.5, window: int = 10) -> list[int]:
    """Steps whose loss is over ``ratio`` times the median of the previous ``window`` finite losses."""
    spikes, seen = [], []
    for step, value in points:
        if not math.isfinite(value):
            continue
        if len(seen) >= 3 and value > ratio * median(seen[-window:]):
            spikes.append(step)
        seen.append(value)
    return spikes


def loss_findings(run: RunState, troubled: list[int]) -> list[Finding]:
    """Spikes, exact zeros, then the trend after the last trouble ("loss smooth after step N")."""
    points = losses(run)
    found, gap = [], log_gap(run)
    spikes = loss_spikes(points)
    if spikes:
        found.append(Finding("warn", "loss_spike", f"loss spike at {step_ranges(spikes, gap)}", tuple(spikes)))
    read_as_nan = {s for s, v in points if math.isnan(v)}
    zeros = [s for s, v in run.column("loss") if v == 0.0 and s not in read_as_nan]
    if zeros:
        found.append(Finding("warn", "loss_zero", f"loss exactly 0.0 at {step_ranges(zeros, gap)}: is every label masked?",
                             tuple(zeros)))
    last_bad = max(troubled + spikes + zeros, default=None)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    after = [(s, v) for s, v in finite if last_bad is None or s > last_bad]
    if len(after) >= 2:
        since = f"smooth after step {last_bad}" if last_bad is not None else "smooth"
        return found + [trend_finding(f"loss {since}", after)]
    if len(finite) >= 2:  # trouble up to the latest log lines: the whole run's trend, said so
        return found + [trend_finding(f"loss over steps {finite[0][0]}–{finite[-1][0]}", finite,
                                      f"; troubled up to step {last_bad}")]
    return found + ([Finding("warn", "loss", "fewer than 2 finite losses logged")] if points else [])


def trend_finding(what: str, points: list[tuple[int, float]], tail: str = "") -> Finding:
    first, last = points[0][1], points[-1][1]
    change = (last - first) / abs(first) * 100 if first else 0.0
    trend = "rising" if change > 5 else "flat" if abs(change) <= 1 else "falling"
    return Finding("warn" if trend == "rising" else "ok", "loss",
                   f"{what}: {num(first)} → {num(last)} ({change:+.1f}%, {trend}){tail}")


def lr_finding(run: RunState) -> Finding | None:
    """Warm-up then decay, as the note expects; just described, not judged."""
    points = [(s, v) for s, v in run.column("learning_rate") if math.isfinite(v)]
    if not points:
        return None
    peak_step, peak = max(points, key=lambda p: p[1])
    rise = f"warm-up to {peak:.2g} by step {peak_step}" if points[0][1] < peak else f"starts at {peak:.2g}"
    return Finding("ok", "lr", f"learning rate {rise}, now {points[-1][1]:.2g} (step {points[-1][0]})")


TROUBLE_TOPICS = ("stop", "nonfinite", "grad_norm_high", "skip", "alert", "rollback")


def diagnose(run: RunState) -> Diagnosis:
    """Every finding, in reading order: stops, NaNs, grad norm, skips, alerts, rollbacks, loss, LR."""
    nonfinite = nonfinite_finding(run)
    found = stop_findings(run) + ([nonfinite] if nonfinite else []) + grad_norm_findings(run)
    found += skip_findings(run) + event_findings(run, "alert", "alert") + event_findings(run, "rollback", "rollback")
    troubled = [s for f in found if f.topic in TROUBLE_TOPICS for s in f.steps]
    found += loss_findings(run, troubled)
    lr = lr_finding(run)
    return Diagnosis(found + ([lr] if lr else []))
