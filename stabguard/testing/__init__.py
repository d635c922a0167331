"""Testing guards: run one on the tiny Qwen3-VL in seconds, with faults injected, and read what it did.

The built-in guards' tests use exactly this. With stabguard installed, pytest loads the fixtures in
:mod:`stabguard.testing.pytest_plugin` (entry point ``pytest11``): ``stabguard_tiny_assets`` (the tiny
model and data, built once per session) and ``run_guard`` (:func:`run_guard` bound to them and to
``tmp_path``)::

    def test_my_guard_skips_a_loss_spike(run_guard):
        run = run_guard(my_guard, steps=4, faults={"loss_spike_at": [3]})
        assert run.steps("SKIP") == [3]

:func:`run_probe` runs ``stabguard check --probe`` on a recipe with the plugin under test, for a guard
that adds its own probe findings (the ``probe`` hook).

Hypothesis strategies for Qwen-style conversations are in :mod:`stabguard.testing.strategies`. A warm tiny
model (one that has learned the answer format, for faults a random model cannot show) is built and cached
by :func:`stabguard.testing.warm.warm_tiny_assets`.
"""

from __future__ import annotations

from stabguard.testing.probes import GradFault, LossFault, PoisonBatch, StepProbe, StopAt, same_state, trainable_state
from stabguard.testing.recipes import build_tiny_assets, tiny_recipe, toml_dumps, toml_value, write_recipe
from stabguard.testing.runs import GuardRun, guard_plugins, run_guard, run_probe

__all__ = [
    "GradFault", "GuardRun", "LossFault", "PoisonBatch", "StepProbe", "StopAt", "build_tiny_assets",
    "guard_plugins", "run_guard", "run_probe", "same_state", "tiny_recipe", "toml_dumps", "toml_value", "trainable_state",
    "write_recipe",
]
