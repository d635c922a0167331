"""stabguard.testing: run_guard with every fault the injector makes, and the fixtures plugin authors get."""

from __future__ import annotations

import math

import pytest
import torch

from stabguard import Verdict, hookimpl
from stabguard.plugins import nonfinite


class SkipStepTwo:
    """A third-party-style guard object: skips step 2, says why."""

    @hookimpl
    def pre_step(self, state):
        if state.step == 2:
            return Verdict.skip("test skips step 2", "skip-two")


@pytest.mark.parametrize("fault", ["nan_grad_at", "inf_grad_at", "nan_pixels_at"])
def test_nonfinite_faults_are_skipped_by_the_nonfinite_guard(run_guard, fault):
    run = run_guard(nonfinite, steps=3, faults={fault: [2]})
    assert run.ok and run.steps("SKIP") == [2], run.reasons
    finding = run.events_of("finding", "nonfinite")[0]
    assert finding["step"] == 2 and finding["values"]["cause"].startswith("non-finite ")


def test_a_fully_masked_batch_gives_a_nan_loss_and_a_skip(run_guard):
    run = run_guard(nonfinite, steps=3, faults={"masked_batch_at": [1]})
    assert run.steps("SKIP") == [1] and math.isnan(run.losses[1]), run.reasons
    assert [e["values"]["fault"] for e in run.events_of("info", "faults") if "fault" in e["values"]] == ["masked_batch"]


def test_the_mask_guard_stops_a_fully_masked_batch_before_any_update(run_guard):
    run = run_guard("stabguard.plugins.mask", steps=3, faults={"masked_batch_at": [1]})
    assert not run.ok and run.steps("STOP") == [1] and "every label in the batch is -100" in run.result.stop_reason


def test_a_loss_spike_is_rolled_back_by_the_spike_guard(run_guard):
    run = run_guard("stabguard.plugins.spike", steps=6, faults={"loss_spike_at": [5], "loss_scale": 1000.0},
                    options={"spike": {"min_history": 3, "window": 4, "z": 3.0}})
    assert run.steps("ROLLBACK") == [5], run.reasons
    assert run.losses[5] > 100 * run.losses[4]


def test_weights_come_back_and_a_damaging_update_changes_them(run_guard):
    clean = run_guard(SkipStepTwo(), steps=3)
    damaged = run_guard(SkipStepTwo(), steps=3, faults={"damage_at": [3]})
    assert clean.steps("SKIP") == [2] and clean.verdicts == damaged.verdicts
    assert clean.weights.keys() == damaged.weights.keys() and any("lora_B" in n for n in clean.weights)
    assert not all(torch.equal(clean.weights[n], damaged.weights[n]) for n in clean.weights)


def test_no_fault_no_skip_and_the_guard_instance_is_reachable(run_guard):
    run = run_guard(nonfinite, steps=2, faults={})
    assert run.verdicts == {1: "PROCEED", 2: "PROCEED"} and run.guard("nonfinite").total == 0


def test_the_pytest_plugin_is_registered_through_its_entry_point(pytestconfig):
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="pytest11") if e.name == "stabguard"] == ["stabguard.testing.pytest_plugin"]
    assert pytestconfig.pluginmanager.get_plugin("stabguard") is not None
