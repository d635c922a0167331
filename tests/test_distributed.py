"""DDP on two CPU ranks (gloo, torchrun): a hook that raises on one rank stops both with the same reason.

The run is tests/engine_worker.py (its docstring lists the scenarios); the fault scenario every engine
shares is in tests/test_engines.py. About 20 s per launch on 2 cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch.distributed as dist
from support_launch import engine_run

from stabguard.events import read_events

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)]


@pytest.mark.parametrize("hook, rank", [("post_collate", 1), ("pre_step", 0)])
def test_a_hook_raising_on_one_rank_stops_both_with_the_same_reason(tmp_path, tiny_assets, hook, rank):
    rank0, rank1 = engine_run(tmp_path, "ddp", hook, tiny_assets)  # returns: neither rank hung
    for report in (rank0, rank1):
        assert not report["ok"] and report["error"] == "crash"
        assert report["stop_reason"] == rank0["stop_reason"]
        assert f"hook {hook} of plugin 'fault-0', rank {rank}" in report["stop_reason"]
        assert "ValueError: a bug on rank" in report["stop_reason"]
    assert rank0["run"] == rank1["run"], "one run id on every rank"
    if hook == "post_collate":
        assert "samples: " in rank0["stop_reason"], "a data hook's failure names the samples"
    events = read_events(tmp_path / "run" / "events.jsonl")
    (error,) = [e for e in events if e["kind"] == "error"]
    assert error["rank"] == rank and error["values"]["hook"] == hook, "the failing rank's own line"
    (stop,) = [e for e in events if e["kind"] == "stop"]
    assert stop["rank"] == 0 and stop["values"]["checkpoint"], "a step ran: the last good state is saved"
    assert (Path(stop["values"]["checkpoint"]) / "stabguard_state.json").exists()
