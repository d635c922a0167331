"""Two ranks under torchrun on CPU (gloo), faults on rank 1 only: both ranks decide alike, weights stay equal.

The run itself is tests/dist_worker.py (its docstring lists the faults); this test launches it and
compares what each rank wrote. About 30 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)


def launch(tiny_assets, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tiny_assets["model"]), str(tiny_assets["train"]), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_faults_on_one_rank_are_decided_alike_on_both(tmp_path, tiny_assets):
    rank0, rank1 = launch(tiny_assets, tmp_path)
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["ok"] and rank1["ok"]
    skipped = [int(s) for s, v in rank0["verdicts"].items() if v == "SKIP"]
    assert skipped == [2, 4, 7], "rank 1's NaN loss, its NaN gradient and its loss spike"
    assert rank0["verdicts"] == rank1["verdicts"] and rank0["skipped_steps"] == rank1["skipped_steps"] == 3
    assert rank0["digests"] == rank1["digests"], "the ranks' weights must stay bit-identical"
    digests = rank0["digests"]
    assert digests["2"] == digests["1"] and digests["4"] == digests["3"], "a skipped step changes nothing"
    assert digests["7"] == digests["5"] != digests["6"], "the rollback restores step 5's snapshot on both ranks"
    assert rank0["lrs"] == rank1["lrs"] and rank0["lrs"]["3"] == rank0["lrs"]["2"]
    for rank in (rank0, rank1):  # rank 0 saw none of rank 1's loss faults, yet records the same decisions
        assert [e for e in rank["events"] if e[0] == "rollback"] == [["rollback", "spike", 7]]
        assert [e[2] for e in rank["events"] if e[0] == "skip"] == [2, 4, 7]
