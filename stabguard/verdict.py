"""What a guard says about an optimizer step, and how many guards' answers combine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum


class Action(IntEnum):
    """Ordered by severity: combining keeps the largest.

    ROLLBACK is a SKIP that also restores the core's last verified snapshot (weights and optimizer
    state); where no snapshot exists yet it acts as a SKIP.
    """

    PROCEED = 0
    SKIP = 1
    ROLLBACK = 2
    STOP = 3


@dataclass(frozen=True)
class Verdict:
    """A guard's decision for one optimizer step, with the reason a person will read."""

    action: Action
    reason: str = ""
    guard: str = ""
    error: str = ""  # "crash" or "refused" when the core made this STOP from a hook that raised

    @classmethod
    def proceed(cls) -> Verdict:
        return cls(Action.PROCEED)

    @classmethod
    def skip(cls, reason: str, guard: str = "") -> Verdict:
        return cls(Action.SKIP, reason, guard)

    @classmethod
    def rollback(cls, reason: str, guard: str = "") -> Verdict:
        return cls(Action.ROLLBACK, reason, guard)

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
    """A guard refuses to go on (set-up, data); the message says why."""


class HookError(RuntimeError):
    """A plugin's hook raised. Names the hook, the plugin and the rank; ``cause`` is the exception.

    During training the core turns it into a STOP agreed across ranks, so every rank ends with the
    same message (exit 4 from ``stabguard run``).
    """

    def __init__(self, hook: str, plugin: str, cause: BaseException, rank: int = 0):
        self.hook, self.plugin, self.cause, self.rank = hook, plugin, cause, rank
        self.samples: list[str] = []  # filled in by the core for the data hooks
        super().__init__(str(cause))

    def __str__(self) -> str:
        where = f"; samples: {', '.join(self.samples)}" if self.samples else ""
        return (f"{type(self.cause).__name__}: {self.cause} (hook {self.hook} of plugin {self.plugin!r}, "
                f"rank {self.rank}{where})")


class HookRefusal(HookError, GuardError):
    """A hook raised :class:`GuardError`: a guard's deliberate refusal (exit 1), not a crash."""

    def __str__(self) -> str:
        return super().__str__().removeprefix("GuardError: ")


def combine(verdicts: Iterable[Verdict | None]) -> Verdict:
    """STOP > SKIP > PROCEED; the reasons of every verdict at the winning severity are joined."""
    given = [v for v in verdicts if v is not None]
    for v in given:
        if not isinstance(v, Verdict):
            raise TypeError(f"a hook returned {v!r}: a guard must return a stabguard.Verdict "
                            "(Verdict.skip(reason, guard), Verdict.rollback(...), Verdict.stop(...)) or None")
    if not given:
        return Verdict.proceed()
    worst = max(v.action for v in given)
    top = [v for v in given if v.action == worst]
    if worst == Action.PROCEED:
        return Verdict.proceed()
    reason = "; ".join(dict.fromkeys(f"{v.guard}: {v.reason}" if v.guard else v.reason for v in top))
    guards = ",".join(dict.fromkeys(v.guard for v in top if v.guard))
    return Verdict(worst, reason, guards, next((v.error for v in top if v.error), ""))


def from_failure(exc: HookError) -> Verdict:
    """The STOP the core makes of a hook that raised."""
    return Verdict(Action.STOP, str(exc), exc.plugin, "refused" if isinstance(exc, HookRefusal) else "crash")
