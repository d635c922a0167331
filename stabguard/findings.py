"""Findings: what ``stabguard check`` and its probe report, and how the guards' own hooks add to them.

Below both :mod:`stabguard.check` (every preflight) and :mod:`stabguard.probe` (one real step): each
calls the guards' ``preflight``/``probe`` hooks through :func:`guard_findings` and reports into one
:class:`Report`.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from typing import Any

from stabguard.events import EventLog
from stabguard.verdict import GuardError


@dataclass
class Finding:
    check: str
    level: str  # ok | info | warn | error
    message: str
    details: list[str] = field(default_factory=list)
    guard: str = ""  # the guard that reported it through the preflight hook; "" for the core's own checks
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    recipe: str
    findings: list[Finding] = field(default_factory=list)
    parameters: dict | None = None
    memory: dict | None = None
    recipe_invalid: bool = False

    def add(self, check: str, level: str, message: str, details: list[str] | None = None, *, guard: str = "",
            values: dict[str, Any] | None = None) -> Finding:
        self.findings.append(Finding(check, level, message, list(details or []), guard, dict(values or {})))
        return self.findings[-1]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def as_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "ok": not self.errors, "findings": [asdict(f) for f in self.findings],
                "parameters": self.parameters, "memory": self.memory}


# -- running the guards ----------------------------------------------------------------------------

def call_each(plugins, hook: str, check: str, report: Report, events: EventLog, **kwargs) -> Any:
    """Call the implementations of ``hook`` one by one, in pluggy's order, so that a refusal or a crash
    is reported per plugin and the other checks still run. A ``firstresult`` hook stops at the first
    non-None result, which is returned. Wrappers are left out; an implementation that needs the
    processor is skipped when there is none (a model that is not local). Findings go under ``check``."""
    caller = getattr(plugins.hook, hook)
    first = caller.spec.opts.get("firstresult", False)
    kwargs["events"] = events
    for impl in reversed(caller.get_hookimpls()):
        name = impl.plugin_name.removeprefix("guard:")
        if impl.hookwrapper or impl.wrapper:
            continue
        if "processor" in impl.argnames and kwargs.get("processor", ...) is None:
            report.add(check, "info", f"{name}: {hook} not run (no processor)")
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except GuardError as exc:
            report.add(check, "error", str(exc) if str(exc).startswith(f"{name}:") else f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a plugin's crash is a finding, not the end of the check
            report.add(check, "error", f"{name}: {hook} failed: {type(exc).__name__}: {exc}")
            continue
        if first and result is not None:
            return result
    return None


KIND_LEVEL = {"alert": "warn", "finding": "warn", "skip": "warn", "drop": "warn", "stop": "error"}


def report_events(events: EventLog, start: int, check: str, report: Report, *, info: bool = True) -> None:
    """What the guards recorded since ``start``, as findings (alerts and findings as warnings)."""
    for event in events.events[start:]:
        level = KIND_LEVEL.get(event["kind"], "info")
        if level != "info" or info:
            message, guard = event["message"], event["guard"]
            report.add(check, level, message if message.startswith(f"{guard}:") else f"{guard}: {message}")


LEVELS = ("ok", "info", "warn", "error")


def guard_findings(plugins, hook: str, report: Report, events: EventLog, **kwargs) -> None:
    """Call each guard's ``hook`` (``preflight``, ``probe``) with a ``report`` function of its own; a crash
    is an error finding of that guard and the others still run; what they recorded as events follows."""
    start = len(events.events)
    for impl in reversed(getattr(plugins.hook, hook).get_hookimpls()):
        guard = impl.plugin_name.removeprefix("guard:")

        def add(level, message, *, check=None, details=(), _guard=guard, **values):
            if level not in LEVELS:
                raise ValueError(f"report level {level!r} is not one of {', '.join(LEVELS)}")
            report.add(check or _guard, level, str(message), [str(d) for d in details], guard=_guard, values=values)

        given = {**kwargs, "report": add, "events": events}
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                impl.function(**{arg: given[arg] for arg in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - a plugin's crash is a finding, not the end of the check
            cause = getattr(exc, "cause", exc)
            report.add(guard, "error", f"{guard}: {hook} failed: {type(cause).__name__}: {cause}", guard=guard)
    report_events(events, start, "guards", report)
