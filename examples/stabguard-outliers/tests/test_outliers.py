"""The outliers guard on the tiny Qwen3-VL, through stabguard.testing; and found through its entry point."""

import pydantic
import pytest

import stabguard_outliers


def test_a_loss_spike_is_skipped_and_its_samples_listed_at_the_end(run_guard):
    run = run_guard(stabguard_outliers, steps=6, faults={"loss_spike_at": [5], "loss_scale": 1000.0},
                    options={"outliers": {"min_history": 3}})
    assert run.steps("SKIP") == [5] and run.steps("PROCEED") == [1, 2, 3, 4, 6], run.reasons
    (finding,) = run.events_of("finding", "outliers")
    assert finding["values"]["cause"] == "outlier loss" and finding["values"]["z"] > finding["values"]["threshold"]
    (alert,) = run.events_of("alert", "outliers")
    assert alert["values"]["samples"] == finding["values"]["samples"] and alert["values"]["steps"] == [5]
    assert run.guard("outliers").quarantined == {5: finding["values"]["samples"]}


def test_a_clean_run_quarantines_nothing(run_guard):
    run = run_guard(stabguard_outliers, steps=4, options={"outliers": {"min_history": 2}})
    assert run.steps("PROCEED") == [1, 2, 3, 4] and not run.events_of("alert", "outliers")


def test_options_name_the_bad_key():
    with pytest.raises(pydantic.ValidationError, match="windw"):
        stabguard_outliers.Options(windw=3)


def test_found_through_its_entry_point_and_off_unless_named(monkeypatch):
    from stabguard.manager import AUTOLOAD_ENV, Plugins

    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    plugins = Plugins.for_recipe()
    assert plugins.info["outliers"].source == "entry point"
    assert plugins.info["outliers"].version == "stabguard-outliers 0.1.0"
    assert "outliers" in plugins.guards and plugins.off_unless_named() == {"outliers"}
