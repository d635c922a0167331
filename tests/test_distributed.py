"""Two ranks under torchrun on CPU (gloo), faults on rank 1 only: both ranks decide alike, weights stay equal.

The run itself is tests/dist_worker.py (its docstring lists the faults); this test launches it and
compares what each rank wrote. About 30 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch.distributed as dist
from support_launch import torchrun

from stabguard.events import read_events

WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)]


def launch(tiny_assets, out: Path, scenario: str = "faults") -> list[dict]:
    torchrun(WORKER, tiny_assets["model"], tiny_assets["train"], out, scenario,
             what=f"DDP '{scenario}' on 2 ranks (tests/dist_worker.py)")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_faults_on_one_rank_are_decided_alike_on_both(tmp_path, tiny_assets):
    rank0, rank1 = launch(tiny_assets, tmp_path)
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["ok"] and rank1["ok"]
    dropped = [int(s) for s, v in rank0["verdicts"].items() if v != "PROCEED"]
    assert dropped == [2, 4, 7], "rank 1's NaN loss, its NaN gradient and its loss spike"
    assert rank0["verdicts"]["7"] == "ROLLBACK"
    assert rank0["verdicts"] == rank1["verdicts"] and rank0["dropped_steps"] == rank1["dropped_steps"] == 3
    assert rank0["digests"] == rank1["digests"], "the ranks' weights must stay bit-identical"
    digests = rank0["digests"]
    assert digests["2"] == digests["1"] and digests["4"] == digests["3"], "a skipped step changes nothing"
    assert digests["7"] == digests["5"] != digests["6"], "the rollback restores the state after step 5 on both ranks"
    assert rank0["lrs"] == rank1["lrs"] and rank0["lrs"]["3"] == rank0["lrs"]["2"]
    for rank in (rank0, rank1):  # rank 0 saw none of rank 1's loss faults, yet records the same decisions
        assert [e for e in rank["events"] if e[0] == "rollback"] == [["rollback", "spike", 7]]
        assert [e[2] for e in rank["events"] if e[0] == "skip"] == [2, 4]
    assert rank0["run"] == rank1["run"], "one run id on every rank"


@pytest.mark.parametrize("hook, rank", [("post_collate", 1), ("pre_step", 0)])
def test_a_hook_raising_on_one_rank_stops_both_with_the_same_reason(tmp_path, tiny_assets, hook, rank):
    rank0, rank1 = launch(tiny_assets, tmp_path, scenario=hook)  # returns: neither rank hung
    for report in (rank0, rank1):
        assert not report["ok"] and report["error"] == "crash"
        assert report["stop_reason"] == rank0["stop_reason"]
        assert f"hook {hook} of plugin 'fault-0', rank {rank}" in report["stop_reason"]
        assert "ValueError: a bug on rank" in report["stop_reason"]
    if hook == "post_collate":
        assert "samples: " in rank0["stop_reason"], "a data hook's failure names the samples"
    events = read_events(tmp_path / "run" / "events.jsonl")
    (error,) = [e for e in events if e["kind"] == "error"]
    assert error["rank"] == rank and error["values"]["hook"] == hook, "the failing rank's own line"
    (stop,) = [e for e in events if e["kind"] == "stop"]
    assert stop["rank"] == 0 and stop["values"]["checkpoint"], "a step ran: the last good state is saved"
    assert (Path(stop["values"]["checkpoint"]) / "stabguard_state.json").exists()
