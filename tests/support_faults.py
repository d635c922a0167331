"""The gradient-guard tests' runs: faults and probes come from ``stabguard.testing`` (public, one copy).

Used by tests/plugins/test_{nonfinite,grad_norm,spike}.py and tests/engine_worker.py.
"""

from __future__ import annotations

from stabguard.runner import run
from stabguard.testing import (  # noqa: F401 - re-exported for the tests
    GradFault, LossFault, PoisonBatch, StepProbe, StopAt, same_state, tiny_recipe, trainable_state, write_recipe,
)
from stabguard.testing import guard_plugins as _guard_plugins
from stabguard.testing.probes import on_rank  # noqa: F401

GUARDS = ("nonfinite", "grad_norm", "spike")


def guard_plugins(*test_plugins, guards=GUARDS):
    """A fresh manager holding only the given built-in guards and the test plugins."""
    return _guard_plugins(*test_plugins, guards=tuple(guards), prefix="fault")


def run_guarded(tmp_path, assets, *test_plugins, training=None, guards=None, resume=None, enabled=GUARDS, heal=False,
                **top):
    """One tiny run with the gradient guards; returns (RunResult, Plugins). ``top``: recipe top-level keys."""
    plugins = guard_plugins(*test_plugins, guards=enabled)
    recipe = tiny_recipe(assets, tmp_path / "out", training=training, guards=guards, **top)
    return run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins, resume=resume,
               heal=heal), plugins
