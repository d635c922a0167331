"""Run a guard on the tiny Qwen3-VL for a few steps, with faults injected, and read back what happened."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from stabguard.manager import BUILTIN_PLUGINS, Plugins
from stabguard.testing.probes import StepProbe
from stabguard.testing.recipes import tiny_recipe, write_recipe


def guard_plugins(*test_plugins: Any, guards: tuple[str, ...] = (), under_test: Any = None,
                  prefix: str = "test-plugin") -> Plugins:
    """A fresh manager: the named built-in guards, the plugin under test, then the test plugins.

    Nothing is autoloaded from entry points: a test sees only what it names. Test plugins are
    registered as ``<prefix>-0``, ``<prefix>-1``, ...
    """
    plugins = Plugins()
    for name in guards:
        plugins.load_module(BUILTIN_PLUGINS[name], name=name, source="built-in")
    if under_test is not None:
        module = importlib.import_module(under_test) if isinstance(under_test, str) else under_test
        plugins.register(module, name=_name_of(module), source="registered")
    for i, plugin in enumerate(test_plugins):
        plugins.register(plugin, name=f"{prefix}-{i}")
    plugins.collect_guards()
    return plugins


def _name_of(plugin: Any) -> str:
    return plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__name__


@dataclass
class GuardRun:
    """What a :func:`run_guard` run did.

    :ivar result: the :class:`~stabguard.runner.RunResult` (``ok``, ``stop_reason``, ``skipped_steps``).
    :ivar events: every event of the run, as written to ``events.jsonl`` (dicts: step, guard, kind,
        message, values).
    :ivar verdicts: the agreed verdict of every optimizer step, ``{step: "PROCEED" | "SKIP" | ...}``.
    :ivar reasons: ``{step: str(verdict)}``, e.g. ``"SKIP [nonfinite] non-finite loss (...)"``.
    :ivar losses: ``{step: loss}`` as the guards saw it (host floats).
    :ivar weights: the trainable parameters at the end of the run, ``{name: CPU tensor}``.
    :ivar plugins: the plugin manager the run used (``plugins.guards[name].instance`` is your guard).
    """

    result: Any
    events: list[dict]
    verdicts: dict[int, str]
    reasons: dict[int, str]
    losses: dict[int, float]
    weights: dict[str, torch.Tensor] = field(repr=False)
    plugins: Plugins = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.result.ok

    def steps(self, action: str) -> list[int]:
        """Steps whose agreed verdict was ``action`` ("PROCEED", "SKIP", "ROLLBACK", "STOP")."""
        return sorted(s for s, v in self.verdicts.items() if v == action.upper())

    def events_of(self, kind: str | None = None, guard: str | None = None) -> list[dict]:
        return [e for e in self.events if (kind is None or e["kind"] == kind) and (guard is None or e["guard"] == guard)]

    def guard(self, name: str) -> Any:
        """The instance of an enabled guard (its counters and statistics after the run)."""
        return self.plugins.guards[name].instance


def run_guard(guard: str | ModuleType | Any = None, *, tmp_path: str | Path, assets: dict[str, Path],
              steps: int = 4, options: dict[str, dict] | None = None, faults: dict[str, Any] | None = None,
              builtins: tuple[str, ...] = (), extra: tuple = (), training: dict | None = None,
              **top: Any) -> GuardRun:
    """Train the tiny Qwen3-VL for ``steps`` optimizer steps with ``guard`` loaded, and report back.

    :param guard: your plugin: a module, a module path (``"my_guard"``) or a plugin object.
    :param tmp_path: a folder for the recipe and the run's output.
    :param assets: :func:`~stabguard.testing.build_tiny_assets`' result (fixture ``stabguard_tiny_assets``).
    :param steps: optimizer steps (batch 1, no gradient accumulation, learning rate 1e-3).
    :param options: ``[guards.<name>]`` tables, e.g. ``{"my_guard": {"threshold": 3.0}}``.
    :param faults: :mod:`stabguard.faults` options, e.g. ``{"nan_grad_at": [2], "loss_spike_at": [3]}``.
    :param builtins: built-in guards to run beside yours (e.g. ``("nonfinite",)``); none by default.
    :param extra: more plugin objects to register (probes, other test plugins).
    :param training: TrainingArguments overrides; ``top``: top-level recipe keys.
    """
    probe = StepProbe()
    test_plugins = (*extra, probe) if faults is None else (*extra, probe, importlib.import_module("stabguard.faults"))
    plugins = guard_plugins(*test_plugins, guards=tuple(builtins), under_test=guard)
    tables = dict(options or {})
    if faults is not None:
        tables["faults"] = dict(faults)
    tmp_path = Path(tmp_path)
    recipe = tiny_recipe(assets, tmp_path / "out", training={"max_steps": steps, **(training or {})},
                         guards=tables, **top)
    from stabguard.events import read_events
    from stabguard.runner import run

    result = run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins)
    model = result.trainer.model
    weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    events = read_events(result.output_dir / "events.jsonl")
    return GuardRun(result, [e for e in events if e.get("run") == result.run_id], dict(probe.verdicts),
                    dict(probe.reasons), dict(probe.losses), weights, plugins)


def run_probe(recipe_path: str | Path, *test_plugins: Any, guards: tuple[str, ...] = (), under_test: Any = None,
              batches: int = 2):
    """``stabguard check RECIPE --probe`` with only the named guards, the plugin under test (its ``probe``
    hook) and the test plugins (a ``setup_model`` that breaks the model makes a fault); returns the check's
    :class:`~stabguard.check.Report`: ``[f for f in report.findings if f.check.startswith("probe")]``."""
    from stabguard.check import preflight

    plugins = guard_plugins(*test_plugins, guards=guards, under_test=under_test)
    return preflight(recipe_path, plugins=plugins, probe_batches=batches)
