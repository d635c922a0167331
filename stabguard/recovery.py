"""Recovery: diagnose a rejected step, then heal by its evidence, within a budget, saying what and why.

The guarded step (:mod:`stabguard.step`) replays every step that did not proceed (:mod:`stabguard.replay`)
and hands the agreed :class:`~stabguard.replay.Diagnosis` to :meth:`Recovery.heal`, on every rank:

- **concentrated** (some samples high on their own): exactly those samples are **quarantined**, on any
  rejected step: from then on their rows leave every batch before the forward;
- **transient** (gone on replay): recorded and counted; the rollback already undid it;
- **spread** (every sample high, or only together) and **diverged** (the last verified state itself far
  above the best one kept): the optimizer's trajectory, acted on at a healable STOP.

A healable STOP (a guard's "this keeps going wrong": the spike guard's rollback budget, the divergence
guard) becomes a ROLLBACK plus one remedy while the budget lasts, chosen by the evidence:

- the last verified state is itself high (diverged) -> **rewind** to the ring's best earlier state and
  **cool down**;
- transients in a burst (the updates keep breaking the restored state) -> **reset_moments** of the module
  ``where`` names when one holds most of the norm, else **cool down**; an isolated transient -> a retry;
- no replay (sharded weights) -> cool down, then tighten the clip.

A cool-down brings the learning rate ``lr_cut`` times below the rate in force where it went wrong (OPT, by
hand): the first step of the burst, or, after a rewind, the first of three high steps since the state it
went back to. A remedy that did not help (a healable STOP came again) is not chosen again. Guards propose
their own remedies through ``propose_remedies``. Each remedy is a ``remedy`` event with its evidence and
before/after values; everything is in every checkpoint (:meth:`Recovery.state_dict`). Healthy steps pay
no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stabguard.recipe_schema import RecoverySection
from stabguard.replay import Diagnosis
from stabguard.verdict import Action, HookError, Verdict

UNNAMED = "batch row "  # a row a framework built without an id: never quarantined (it names no sample)
HISTORY = 200  # steps of (lr, loss) kept to find where the loss first went high


@dataclass
class Remedy:
    """A change to the run, proposed by the core or by a guard (``propose_remedies``), applied and recorded
    by the core.

    :ivar name: what it is ("quarantine", "cool_down", "rewind", "reset_moments", "tighten_clip", "retry",
        or a guard's own name for it).
    :ivar evidence: why, in words a person reads in the event.
    :ivar apply: a guard's remedy: does the change and returns ``{"before": ..., "after": ...}`` (JSON
        values). Called once, on every rank, between the restore of the verified state and the next step.
    :ivar by: who proposed it (a guard's name; "core" for the built-ins).
    :ivar samples: a quarantine's samples.
    """

    name: str
    evidence: str
    apply: Callable[[], dict] | None = field(default=None, repr=False)
    by: str = "core"
    samples: list[str] = field(default_factory=list)


class Recovery:
    """The core's recovery policy and everything it changed so far (quarantine, cool-down, clip)."""

    def __init__(self, options: RecoverySection | None, events):
        self.options, self.events = options or RecoverySection(), events
        self.quarantined: dict[str, dict] = {}  # sample -> {"step", "evidence"}
        self.cool: dict | None = None  # {"factor": f, "until": step, or None for the rest of the run}
        self.clip: float | None = None
        self.applied: list[list] = []  # [step, remedy name] of every remedy, for the budget
        self.rejected: list[list] = []  # [step, diagnosis kind] of every rejected step
        self.history: dict[int, list] = {}  # step -> [lr, loss or None], the last HISTORY steps
        self.pending: str | None = None  # resumed with --heal after a STOP: why the next remedy is due

    # -- every step (no host sync) -------------------------------------------------------------------

    def steady(self, state, host) -> None:
        """Before the guards decide: the tightened clip, and the end of a cool-down that ran out."""
        if self.clip is not None:
            state.clip_to(self.clip)
        if self.cool and self.cool["until"] is not None and state.step > self.cool["until"]:
            before, after = host.scale_lr(1 / self.cool["factor"])
            self.events.record("core", "remedy", f"step {state.step}: cool-down ended, learning rate {before:.3g} "
                               f"-> {after:.3g}", step=state.step, remedy="cool_down_end", before=before, after=after)
            self.cool = None

    def remember(self, step: int, lr: float, loss: float | None) -> None:
        """The step's learning rate and (when a guard read it) loss: where a cool-down aims."""
        self.history[step] = [lr if isinstance(lr, (int, float)) else None, loss]  # a tensor rate: not read
        self.history.pop(step - HISTORY, None)

    def drop_rows(self, ids: list[str]) -> list[int]:
        """The rows of a batch (by sample id) that are quarantined."""
        return [i for i, sid in enumerate(ids) if sid in self.quarantined]

    def heal_pending(self, state, host, context) -> list[dict]:
        """Resumed with ``--heal`` after a STOP: a trajectory remedy at the first step, asked for by the person
        who resumed (it counts in the budget, but is applied even when the budget is spent)."""
        evidence, self.pending = self.pending, None
        remedy = self._trajectory(Diagnosis("unknown", [], evidence), context, burst=True)
        return [self._apply(remedy, state, host, context)] if remedy else []

    def next_remedy(self) -> str | None:
        """The remedy ``--heal`` would use."""
        remedy = self._trajectory(Diagnosis("unknown", [], ""), None, burst=True)
        return remedy.name if remedy else None

    # -- a step that did not proceed -----------------------------------------------------------------

    def admit(self, state) -> bool:
        """A healable STOP with room in the budget becomes a ROLLBACK, before it is applied; :meth:`heal`
        then picks its remedy (or gives the STOP back)."""
        verdict = state.verdict
        if not (self.options.enabled and verdict.action == Action.STOP and verdict.healable):
            return False
        if self._room(state.step) <= 0:
            state.verdict = self.spent(state)
            return False
        state.verdict = Verdict(Action.ROLLBACK, verdict.reason, verdict.guard, verdict.error, healable=True)
        return True

    def heal(self, state, diagnosis: Diagnosis, host, hook, context) -> list[dict]:
        """Act on a rejected step's agreed ``diagnosis``; ``admitted``: a healable STOP :meth:`admit` turned
        into a ROLLBACK, which needs a remedy or becomes a STOP again. Returns the remedies applied."""
        if not self.options.enabled:
            return []
        admitted = state.verdict.action == Action.ROLLBACK and state.verdict.healable
        burst = self._in_burst(state.step)
        self.rejected = [r for r in self.rejected if state.step - r[0] < self.options.budget_window]
        self.rejected.append([state.step, diagnosis.kind])
        if diagnosis.kind != "unknown" or admitted:
            self.events.record("core", "diagnosis", f"step {state.step}: {diagnosis.kind}: {diagnosis.said}",
                               step=state.step, **diagnosis.values())
        remedy = self._quarantine_of(diagnosis)
        if admitted and remedy is None:
            remedy = self._proposed(state, hook) or self._trajectory(diagnosis, context, burst)
        if remedy is None or (not admitted and self._room(state.step) <= 0):
            if admitted:
                state.verdict = self.spent(state, "no remedy left for this evidence" if remedy is None else "")
            return []
        done = self._apply(remedy, state, host, context)
        if admitted:
            state.verdict = Verdict(Action.ROLLBACK, f"{state.verdict.reason}; healed: {remedy.name}",
                                    state.verdict.guard)
        return [done]

    def _in_burst(self, step: int) -> bool:
        return bool(self.rejected) and step - self.rejected[-1][0] <= self.options.burst_steps

    def _quarantine_of(self, diagnosis: Diagnosis) -> Remedy | None:
        fresh = [s for s in diagnosis.samples if s not in self.quarantined and not s.startswith(UNNAMED)]
        if diagnosis.kind != "concentrated" or not fresh or "quarantine" not in self.options.remedies:
            return None
        return Remedy("quarantine", diagnosis.said, samples=fresh)

    def _proposed(self, state, hook) -> Remedy | None:
        found = hook.propose_remedies(state=state, recovery=self, events=self.events)
        return next((r for f in found for r in (f if isinstance(f, list) else [f]) if r is not None), None)

    def _trajectory(self, diagnosis: Diagnosis, context, burst: bool) -> Remedy | None:
        """The remedy for a run whose updates, not its data, keep going wrong (none tried in vain before)."""
        failed = self._failed()
        allowed = [r for r in self.options.remedies if r not in failed]
        share = context.top_share() if context is not None else (None, 0.0)
        if diagnosis.kind == "diverged" and "rewind" in allowed and context is not None and context.can_rewind():
            return Remedy("rewind", diagnosis.said)
        if diagnosis.kind == "transient" and not burst:
            return Remedy("retry", f"{diagnosis.said}; the last rejected step was more than "
                          f"{self.options.burst_steps} steps ago: a one-off, the rollback undoes it")
        if "reset_moments" in allowed and share[0] and share[1] >= self.options.moments_share:
            return Remedy("reset_moments", f"{diagnosis.said}; {share[1]:.0%} of the grad norm in {share[0]}")
        for name in ("cool_down", "tighten_clip"):
            if name in allowed:
                return Remedy(name, diagnosis.said or "the run would have stopped")
        return None

    def _failed(self) -> set[str]:
        """Remedies whose effect did not last: a healable STOP was healed again after them."""
        return {name for _, name in self.applied if name != "quarantine"}

    def spent(self, state, why: str = "") -> Verdict:
        opts, verdict = self.options, state.verdict
        recent = [f"{name} at step {s}" for s, name in self.applied if state.step - s < opts.budget_window]
        said = why or (f"recovery budget spent ({opts.budget} remedies within {opts.budget_window} steps: "
                       f"{', '.join(recent) or 'none allowed'})")
        return Verdict(Action.STOP, f"{verdict.reason}; {said}", verdict.guard, verdict.error, healable=True)

    def _apply(self, remedy: Remedy, state, host, context) -> dict:
        change = self._change(remedy, state, host, context)
        self.applied.append([state.step, remedy.name])
        left = self._room(state.step)
        record = {"remedy": remedy.name, "by": remedy.by, "evidence": remedy.evidence, "budget_left": left, **change}
        self.events.record(remedy.by, "remedy", f"step {state.step}: {remedy.name}: {_said(change)} "
                           f"({remedy.evidence}; {left} left in the budget)", step=state.step,
                           trigger=state.verdict.reason, **record)
        return record

    def _change(self, remedy: Remedy, state, host, context) -> dict:
        if remedy.apply is not None:
            try:
                return dict(remedy.apply() or {})
            except Exception as exc:  # the STOP stands; the core records the failure like a hook's
                raise HookError("propose_remedies", remedy.by, exc) from exc
        if remedy.name == "quarantine":
            return self._quarantine(remedy, state.step)
        if remedy.name == "rewind":
            rewound = context.rewind()
            since = self._went_high(rewound["restored_step"], rewound["restored_loss"])
            return {**rewound, **self._cool_down(state.step, host, since)}
        if remedy.name == "cool_down":
            return self._cool_down(state.step, host, self._burst_start(state.step))
        if remedy.name == "reset_moments":
            return context.reset_moments()
        if remedy.name == "tighten_clip":
            return self._tighten_clip(host)
        return {}  # retry: the rollback is the remedy

    def _room(self, step: int) -> int:
        """Remedies the budget still allows at ``step``."""
        return self.options.budget - sum(step - s < self.options.budget_window for s, _ in self.applied)

    def _quarantine(self, remedy: Remedy, step: int) -> dict:
        for sid in remedy.samples:
            self.quarantined[sid] = {"step": step, "evidence": remedy.evidence}
        return {"samples": list(remedy.samples), "before": len(self.quarantined) - len(remedy.samples),
                "after": len(self.quarantined)}

    def _cool_down(self, step: int, host, broke_at: int | None) -> dict:
        """The learning rate ``lr_cut`` times below the rate in force at step ``broke_at`` (and below now)."""
        peak = host.peak_lr()
        broke = self.history.get(broke_at, [peak])[0] if broke_at is not None else peak
        broke = broke if isinstance(broke, (int, float)) and broke > 0 else peak
        factor = min(1.0, broke / peak) / self.options.lr_cut if peak else 1 / self.options.lr_cut
        before, after = host.scale_lr(factor)
        total = factor * (self.cool["factor"] if self.cool else 1.0)
        until = step + self.options.cool_steps if self.options.cool_steps else None
        self.cool = {"factor": total, "until": until}
        return {"before": before, "after": after, "until": until, "peak_before": peak, "peak_after": peak * factor,
                "broke_at": broke_at, "broke_lr": broke}

    def _burst_start(self, step: int) -> int:
        """The first rejected step of the burst that ends at ``step`` (each within ``burst_steps`` of the next)."""
        start = step
        for rejected, _ in reversed(self.rejected):
            if start - rejected > self.options.burst_steps:
                break
            start = min(start, rejected)
        return start

    def _went_high(self, since: int, reference: float | None) -> int | None:
        """The first step after ``since`` from which three losses in a row (the highest of any rank's) were
        above ``evidence_factor`` times ``reference``: where the run left the state it is rewound to."""
        if reference is None:
            return None
        losses = [(s, loss) for s, (_, loss) in sorted(_highest_across_ranks(self.history).items()) if s > since]
        high = [s for s, loss in losses if loss is not None and not loss <= self.options.evidence_factor * reference]
        return next((s for s in high if {s + 1, s + 2} <= set(high)), high[0] if high else None)

    def _tighten_clip(self, host) -> dict:
        before = self.clip if self.clip is not None else host.max_grad_norm()
        self.clip = before * self.options.clip_factor if before else self.options.clip_start
        return {"before": before, "after": self.clip}

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"quarantined": self.quarantined, "cool": self.cool, "clip": self.clip, "applied": self.applied,
                "rejected": self.rejected, "history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.quarantined = dict(saved.get("quarantined", {}))
        self.cool, self.clip = saved.get("cool"), saved.get("clip")
        self.applied = [list(a) for a in saved.get("applied", [])]
        rejected = saved.get("rejected", [])
        self.rejected = [list(r) for r in rejected] if isinstance(rejected, list) else []  # older: a dict
        self.history = {int(k): list(v) for k, v in saved.get("history", {}).items()}


def _highest_across_ranks(history: dict[int, list]) -> dict[int, list]:
    """Each step's [lr, loss] with the highest loss any rank saw (one collective: at a remedy, on every rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return history
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, history)
    merged: dict[int, list] = {}
    for rank in everyone:
        for step, (lr, loss) in (rank or {}).items():
            seen = merged.get(step, [lr, None])[1]
            merged[step] = [lr, loss if seen is None or (loss is not None and not loss <= seen) else seen]
    return merged


def _said(change: dict) -> str:
    if "samples" in change:
        return f"{len(change['samples'])} sample(s) never trained on again: {', '.join(change['samples'])}"
    if "restored_step" in change:
        return (f"back to the state after step {change['restored_step']} (loss {_number(change['restored_loss'])}), "
                f"learning rate {_number(change['before'])} -> {_number(change['after'])}")
    if "tensors" in change:
        return f"Adam moments of {len(change['tensors'])} tensor(s) in {change['module']} reset"
    if not change:
        return "rolled back, nothing else changed"
    until = f" until step {change['until']}" if change.get("until") else ""
    return f"{_number(change.get('before'))} -> {_number(change.get('after'))}{until}"


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
