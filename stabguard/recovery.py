"""Recovery: heal a run before it stops, within a budget, and say what was changed and why.

The guarded step (:mod:`stabguard.step`) hands every agreed step that did not proceed to
:meth:`Recovery.heal`, on every rank, before the verdict is applied:

- every rejected step's samples (all ranks') are remembered; a sample found in ``repeat`` rejected steps
  is a repeat offender and is **quarantined** at once: from then on its rows reach the model with every
  label -100 and its image's pixels zeroed (no loss, no gradient, wherever it turns up: another epoch,
  another place in the shuffled order, another rank);
- a *healable* STOP (a guard's "this keeps going wrong", e.g. the spike guard's rollback budget; see
  :attr:`~stabguard.verdict.Verdict.healable`) becomes a ROLLBACK to the last verified state, plus one
  remedy: what a guard proposes through the ``propose_remedies`` hook, else the next of ``remedies``:
  quarantine the samples of the rejected steps since the last remedy, **cool down** the learning rate
  (every group scaled by ``cool_factor`` for ``cool_steps`` steps, the scheduler's shape kept), or
  **tighten the clip** (``clip_factor`` times the clip in force).

Each remedy is a ``remedy`` event with its evidence and its before/after values. ``budget`` remedies within
``budget_window`` steps, and the next healable STOP stays a STOP (with the last verified state, as
without recovery). Healthy steps pay no host sync: a clip request and a step-number comparison.
Everything here is in every checkpoint (:meth:`Recovery.state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stabguard import IGNORE_INDEX
from stabguard.recipe_schema import RecoverySection
from stabguard.verdict import Action, HookError, Verdict

UNNAMED = "batch row "  # a row a framework built without an id: never quarantined (it names no sample)


@dataclass
class Remedy:
    """A change to the run, proposed by the core or by a guard (``propose_remedies``), applied and recorded
    by the core.

    :ivar name: what it is ("quarantine", "cool_down", "tighten_clip", or a guard's own name for it).
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
    cursor: int | None = field(default=None, repr=False)  # a built-in's: where the core's order goes on


class Recovery:
    """The core's recovery policy and everything it changed so far (quarantine, cool-down, clip)."""

    def __init__(self, options: RecoverySection | None, events):
        self.options, self.events = options or RecoverySection(), events
        self.rejected: dict[str, list[int]] = {}  # sample -> rejected steps it was in
        self.quarantined: dict[str, dict] = {}  # sample -> {"step": ..., "evidence": ...}
        self.cool: dict | None = None  # {"factor": f, "until": step, or None for the rest of the run}
        self.clip: float | None = None
        self.applied: list[list] = []  # [step, remedy name] of every remedy, for the budget
        self.cursor = 0  # the next built-in remedy a healable STOP uses
        self.since_remedy: list[str] = []  # samples of the rejected steps since the last remedy
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

    def heal_pending(self, state, host) -> list[dict]:
        """Resumed with ``--heal`` after a STOP: the next built-in remedy, at the first step, asked for by the
        person who resumed (it counts in the budget, but is applied even when the budget is spent)."""
        evidence, self.pending = self.pending, None
        return [self._apply(Remedy(r.name, evidence, samples=r.samples, cursor=r.cursor), state, host)
                for r in self._next_builtin()]

    def next_remedy(self) -> str | None:
        """The built-in remedy a healable STOP (or ``--heal``) would use next."""
        found = self._next_builtin()
        return found[0].name if found else None

    def mask(self, ids: list[str], batch: dict, samples: list[dict]) -> list[str]:
        """Quarantined rows of a collated batch (CPU tensors, changed in place): labels -100, their images'
        pixels 0. Returns the ids masked."""
        rows = [i for i, sid in enumerate(ids) if sid in self.quarantined]
        if not rows or not torch.is_tensor(batch.get("labels")):
            return []
        batch["labels"][rows] = IGNORE_INDEX
        grid, pixels = batch.get("image_grid_thw"), batch.get("pixel_values")
        if torch.is_tensor(grid) and torch.is_tensor(pixels):
            counts = [int(s.get("n_images", 0)) for s in samples]
            patches = grid.prod(dim=-1).tolist()
            ends = torch.tensor(patches).cumsum(0).tolist()
            first = [sum(counts[:i]) for i in range(len(counts))]
            for row in rows:
                for image in range(first[row], first[row] + counts[row]):
                    pixels[ends[image] - patches[image]:ends[image]] = 0
        return [ids[i] for i in rows]

    # -- a step that did not proceed -----------------------------------------------------------------

    def heal(self, state, samples: list[str], host, hook) -> list[dict]:
        """Remember the rejected step's ``samples`` (every rank's), quarantine repeat offenders, and turn a
        healable STOP into a ROLLBACK with a remedy while the budget lasts. Returns the remedies applied."""
        opts = self.options
        samples = [s for s in samples if not s.startswith(UNNAMED)]
        for sid in dict.fromkeys(samples):
            self.rejected.setdefault(sid, []).append(state.step)
        self.since_remedy += [s for s in samples if s not in self.since_remedy]
        if not opts.enabled:
            return []
        proposed = self._repeat_offenders(samples)
        stopping = state.verdict.action == Action.STOP and state.verdict.healable
        if stopping and not proposed:
            proposed = [r for found in hook.propose_remedies(state=state, recovery=self, events=self.events)
                        for r in (found if isinstance(found, list) else [found]) if r is not None][:1]
            proposed = proposed or self._next_builtin()
        done = [self._apply(remedy, state, host) for remedy in proposed[:max(self._room(state.step), 0)]]
        if stopping and done:
            names = ", ".join(d["remedy"] for d in done)
            state.verdict = Verdict(Action.ROLLBACK, f"{state.verdict.reason}; healed: {names}", state.verdict.guard)
        elif stopping:
            recent = [f"{name} at step {s}" for s, name in self.applied if state.step - s < opts.budget_window]
            spent = ", ".join(recent) or "none allowed"
            state.verdict = Verdict(Action.STOP, f"{state.verdict.reason}; recovery budget spent ({opts.budget} "
                                    f"remedies within {opts.budget_window} steps: {spent})", state.verdict.guard,
                                    state.verdict.error, healable=True)
        return done

    def _repeat_offenders(self, samples: list[str]) -> list[Remedy]:
        offenders = [s for s in dict.fromkeys(samples)
                     if s not in self.quarantined and len(self.rejected[s]) >= self.options.repeat]
        if not offenders or "quarantine" not in self.options.remedies:
            return []
        steps = sorted({step for s in offenders for step in self.rejected[s]})
        return [Remedy("quarantine", f"in {self.options.repeat}+ rejected steps (steps {', '.join(map(str, steps))})",
                       samples=offenders)]

    def _next_builtin(self) -> list[Remedy]:
        """The next of ``remedies`` from the cursor (a quarantine with no new sample is passed over); the
        cursor moves past it once it is applied."""
        order = self.options.remedies
        fresh = [s for s in self.since_remedy if s not in self.quarantined]
        for offset in range(len(order)):
            name = order[(self.cursor + offset) % len(order)]
            if name != "quarantine":
                return [Remedy(name, "the run would have stopped", cursor=self.cursor + offset + 1)]
            if fresh:
                return [Remedy("quarantine", "the samples of the rejected steps since the last remedy", samples=fresh,
                               cursor=self.cursor + offset + 1)]
        return []

    def _apply(self, remedy: Remedy, state, host) -> dict:
        if remedy.apply is not None:
            try:
                change = dict(remedy.apply() or {})
            except Exception as exc:  # the STOP stands; the core records the failure like a hook's
                raise HookError("propose_remedies", remedy.by, exc) from exc
        elif remedy.name == "quarantine":
            change = self._quarantine(remedy, state.step)
        elif remedy.name == "cool_down":
            change = self._cool_down(state.step, host)
        else:
            change = self._tighten_clip(host)
        self.applied.append([state.step, remedy.name])
        self.since_remedy = []
        if remedy.cursor is not None:
            self.cursor = remedy.cursor
        left = self._room(state.step)
        record = {"remedy": remedy.name, "by": remedy.by, "evidence": remedy.evidence, "budget_left": left, **change}
        self.events.record(remedy.by, "remedy", f"step {state.step}: {remedy.name}: {_said(change)} "
                           f"({remedy.evidence}; {left} left in the budget)", step=state.step,
                           trigger=state.verdict.reason, **record)
        return record

    def _room(self, step: int) -> int:
        """Remedies the budget still allows at ``step``."""
        return self.options.budget - sum(step - s < self.options.budget_window for s, _ in self.applied)

    def _quarantine(self, remedy: Remedy, step: int) -> dict:
        for sid in remedy.samples:
            self.quarantined[sid] = {"step": step, "evidence": remedy.evidence,
                                     "rejected_steps": list(self.rejected.get(sid, []))}
        return {"samples": list(remedy.samples), "before": len(self.quarantined) - len(remedy.samples),
                "after": len(self.quarantined)}

    def _cool_down(self, step: int, host) -> dict:
        factor = self.options.cool_factor
        before, after = host.scale_lr(factor)
        total = factor * (self.cool["factor"] if self.cool else 1.0)
        until = step + self.options.cool_steps if self.options.cool_steps else None
        self.cool = {"factor": total, "until": until}
        return {"before": before, "after": after, "until": until}

    def _tighten_clip(self, host) -> dict:
        before = self.clip if self.clip is not None else host.max_grad_norm()
        self.clip = before * self.options.clip_factor if before else self.options.clip_start
        return {"before": before, "after": self.clip}

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rejected": self.rejected, "quarantined": self.quarantined, "cool": self.cool, "clip": self.clip,
                "applied": self.applied, "cursor": self.cursor, "since_remedy": self.since_remedy}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.rejected = {k: list(v) for k, v in saved.get("rejected", {}).items()}
        self.quarantined = dict(saved.get("quarantined", {}))
        self.cool, self.clip = saved.get("cool"), saved.get("clip")
        self.applied = [list(a) for a in saved.get("applied", [])]
        self.cursor, self.since_remedy = saved.get("cursor", 0), list(saved.get("since_remedy", []))


def _said(change: dict) -> str:
    if "samples" in change:
        return f"{len(change['samples'])} sample(s) never trained on again: {', '.join(change['samples'])}"
    until = f" until step {change['until']}" if change.get("until") else ""
    return f"{_number(change.get('before'))} -> {_number(change.get('after'))}{until}"


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
