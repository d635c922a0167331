"""What a guard says about an optimizer step, and how many guards' answers combine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum


class Action(IntEnum):
    """Ordered by severity: combining keeps the largest."""

    PROCEED = 0
    SKIP = 1
    STOP = 2


@dataclass(frozen=True)
class Verdict:
    """A guard's decision for one optimizer step, with the reason a person will read."""

    action: Action
    reason: str = ""
    guard: str = ""

    @classmethod
    def proceed(cls) -> Verdict:
        return cls(Action.PROCEED)

    @classmethod
    def skip(cls, reason: str, guard: str = "") -> Verdict:
        return cls(Action.SKIP, reason, guard)

    @classmethod
    def stop(cls, reason: str, guard: str = "") -> Verdict:
        return cls(Action.STOP, reason, guard)

    def decided_by(self, guard: str) -> bool:
        """Whether ``guard`` is among the guards behind this (possibly combined) SKIP or STOP."""
        return self.action != Action.PROCEED and guard in self.guard.split(",")

    def __str__(self) -> str:
        who = f"[{self.guard}] " if self.guard else ""
        return f"{self.action.name} {who}{self.reason}".rstrip()


class GuardError(RuntimeError):
    """A guard refuses to go on, outside the optimizer step (set-up, data); the message says why."""


def combine(verdicts: Iterable[Verdict | None]) -> Verdict:
    """STOP > SKIP > PROCEED; the reasons of every verdict at the winning severity are joined."""
    given = [v for v in verdicts if v is not None]
    for v in given:
        if not isinstance(v, Verdict):
            raise TypeError(f"pre_step returned {v!r}: a guard must return a stabguard.Verdict "
                            "(Verdict.skip(reason, guard), Verdict.stop(...)) or None")
    if not given:
        return Verdict.proceed()
    worst = max(v.action for v in given)
    top = [v for v in given if v.action == worst]
    if worst == Action.PROCEED:
        return Verdict.proceed()
    reason = "; ".join(f"{v.guard}: {v.reason}" if v.guard else v.reason for v in top)
    guards = ",".join(dict.fromkeys(v.guard for v in top if v.guard))
    return Verdict(worst, reason, guards)
