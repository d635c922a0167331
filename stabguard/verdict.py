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
    """A guard's decision for one optimizer step, with the reason a person will read.

    ``guard`` names the guards behind it: one name as a guard gives it (``Verdict.skip(reason, "mine")``),
    a tuple of names once verdicts are combined; it is always stored as a tuple (empty: no guard).

    ``healable``: a STOP the core's recovery may turn into a ROLLBACK plus a remedy (quarantine, cool-down,
    tighter clip) while its budget lasts; a guard sets it when its STOP means "this keeps going wrong"
    (the spike guard's rollback budget), not "this run is set up wrongly". Combined, a STOP is healable
    only when every STOP behind it is.
    """

    action: Action
    reason: str = ""
    guard: tuple[str, ...] | str | None = ()
    error: str = ""  # "crash" or "refused" when the core made this STOP from a hook that raised
    healable: bool = False

    def __post_init__(self):
        names = (self.guard,) if isinstance(self.guard, str) else tuple(self.guard or ())
        object.__setattr__(self, "guard", tuple(dict.fromkeys(n for n in names if n)))

    @property
    def by(self) -> str:
        """Who decided, for an event's ``guard`` field: the guards' names joined, or "core"."""
        return ",".join(self.guard) or "core"

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
    def stop(cls, reason: str, guard: str = "", *, healable: bool = False) -> Verdict:
        return cls(Action.STOP, reason, guard, healable=healable)

    def decided_by(self, guard: str) -> bool:
        """Whether ``guard`` is among the guards behind this (possibly combined) SKIP or STOP."""
        return self.action != Action.PROCEED and guard in self.guard

    def __str__(self) -> str:
        who = f"[{','.join(self.guard)}] " if self.guard else ""
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
    """STOP > ROLLBACK > SKIP > PROCEED; the reasons of every verdict at the winning severity are joined,
    each led by its guards' names (once: combining a combined verdict again adds nothing)."""
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
    reason = "; ".join(dict.fromkeys(_led_by_guards(v) for v in top))
    return Verdict(worst, reason, tuple(g for v in top for g in v.guard), next((v.error for v in top if v.error), ""),
                   all(v.healable for v in top))


def _led_by_guards(v: Verdict) -> str:
    lead = f"{v.by}: "
    return v.reason if not v.guard or v.reason.startswith(lead) else lead + v.reason


def from_failure(exc: HookError) -> Verdict:
    """The STOP the core makes of a hook that raised (a guard's plugin is registered as ``guard:<name>``)."""
    return Verdict(Action.STOP, str(exc), exc.plugin.removeprefix("guard:"),
                   "refused" if isinstance(exc, HookRefusal) else "crash")
