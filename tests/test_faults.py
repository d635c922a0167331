"""stabguard/faults.py: the shipped fault injector makes real faults, and the guards act on them."""

import json

from support import tiny_recipe, write_recipe

from stabguard.events import read_events
from stabguard.manager import Plugins
from stabguard.runner import run


def test_injected_faults_are_skipped_and_alerted(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe(["stabguard.faults"])
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 5}, plugins=["stabguard.faults"],
                         guards={"faults": {"nan_grad_at": [2], "grad_scale_at": [4], "grad_scale": 1e5}})
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=plugins)
    assert result.ok and result.skipped_steps == 1
    events = read_events(result.output_dir / "events.jsonl")
    assert [(e["step"], e["guard"]) for e in events if e["kind"] == "skip"] == [(2, "nonfinite")]
    alerts = [e for e in events if e["kind"] == "alert" and e["guard"] == "grad_norm"]
    assert [a["step"] for a in alerts] == [4] and alerts[0]["values"]["grad_norm"] > 10
    logged = {e["step"]: e for e in json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]}
    assert logged[4]["stabguard/grad_norm_post_clip"] == 1.0, "the spiked step is clipped to max_grad_norm"


def test_without_faults_configured_nothing_breaks(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe(["stabguard.faults"])
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", plugins=["stabguard.faults"])
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=plugins)
    assert result.ok and result.skipped_steps == 0
