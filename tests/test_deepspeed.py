"""DeepSpeed ZeRO-1/2/3 on two CPU ranks (gloo, torchrun): the guarded step inside DeepSpeed's engine, for real.

tests/deepspeed_worker.py runs the Trainer's own DeepSpeed path with DeepSpeed's CPU accelerator; nothing is
imitated. Faults hit the last rank only. Each launch takes about 10 s on 2 cores; DeepSpeed's CPU ops are
built before the first one (``deepspeed_cpu_ops``), and a hang fails at the launch's limit (tests/support_launch.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support import tiny_recipe, write_recipe
from support_launch import launch as run_command
from support_launch import torchrun

WORKER = Path(__file__).with_name("deepspeed_worker.py")

pytestmark = [
    pytest.mark.engines,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo"),
]


BUILD_OPS = """
import deepspeed
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()
"""


@pytest.fixture(scope="module", autouse=True)
def deepspeed_cpu_ops(request):
    """DeepSpeed's CPU ops (the shared-memory collective every launch loads, cpu_adam for the offload case),
    built here once per environment, with a message, rather than inside a launch and its time limit."""
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nstabguard tests: DeepSpeed's CPU ops in {os.environ['TORCH_EXTENSIONS_DIR']} (built on first "
              "use: minutes on 2 cores, once per environment)", flush=True)
    run_command([sys.executable, "-c", BUILD_OPS], what="building DeepSpeed's CPU ops (deepspeed_shm_comm, cpu_adam)",
                limit_s=1800)


def launch(out: Path, stage: str, scenario: str, assets) -> list[dict]:
    torchrun(WORKER, stage, assets["model"], assets["train"], out, scenario, cwd=out,
             what=f"DeepSpeed ZeRO-{stage} '{scenario}' on 2 ranks (tests/deepspeed_worker.py)")
    return [json.loads((out / f"rank{r}_{scenario}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("stage, optimizer", [
    ("1", "DeepSpeedZeroOptimizer"), ("2", "DeepSpeedZeroOptimizer"), ("3", "DeepSpeedZeroOptimizer_Stage3"),
    ("2-bf16", "DeepSpeedZeroOptimizer"), ("3-bf16", "DeepSpeedZeroOptimizer_Stage3"),
    ("3-bf16-ga2", "DeepSpeedZeroOptimizer_Stage3"),  # 2 micro-batches per step: the step at the boundary only
    ("2-bf16-offload", "DeepSpeedZeroOptimizer"),  # fp32 masters and optimizer state in CPU memory
])
def test_zero_faults_on_one_rank_are_decided_alike_and_vetoed_by_the_engine(tmp_path, tiny_assets, stage, optimizer):
    rank0, rank1 = launch(tmp_path, stage, "faults", tiny_assets)
    for r in (rank0, rank1):
        assert r["deepspeed"] and r["zero"] == optimizer, "the Trainer ran DeepSpeed's ZeRO optimizer"
        assert r["ok"] and r["global_step"] == 8
        assert r["verdicts"] == rank0["verdicts"]
        for step, norm in r["norms"].items():  # the guards' norm is the one of the full gradients
            full = r["full_norms"][step]
            assert norm == rank0["norms"][step]
            if math.isnan(full):
                assert norm == math.inf, "DeepSpeed's norm reports a NaN gradient as infinite"
            else:
                assert norm == pytest.approx(full, rel=1e-4)
        digests, lrs, counters = r["digests"], r["lrs"], r["counters"]
        assert digests["2"] == digests["1"] and digests["4"] == digests["3"], "a veto changes no partition"
        assert digests["7"] == digests["5"] != digests["6"], "the rollback restores this rank's step-5 partitions"
        assert set(r["stale"].values()) == {0}, "the model reads the weights the optimizer holds, after a restore too"
        assert lrs["3"] == lrs["2"] and lrs["5"] == lrs["4"] and lrs["8"] == lrs["7"], "a veto holds the scheduler"
        assert counters["8"] == {"global_steps": 8, "skipped_steps": 3}, "DeepSpeed counted its own skips"
        assert [(e[0], e[2]) for e in r["events"] if e[0] in ("skip", "rollback")] == [
            ("skip", 2), ("skip", 4), ("rollback", 7)]
    assert {s: v for s, v in rank0["verdicts"].items() if v != "PROCEED"} == {
        "2": "SKIP", "4": "SKIP", "7": "ROLLBACK"}, "rank 1's NaN gradient, its NaN loss, its loss spike"
    assert rank0["digests"]["1"] != rank1["digests"]["1"], "each rank holds its own partition"


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_checkpoint_resumes_partitions_and_guard_state(tmp_path, tiny_assets, stage):
    saved = launch(tmp_path, stage, "save", tiny_assets)
    state4 = json.loads((tmp_path / "run" / "checkpoint-4" / "stabguard_state.json").read_text())
    assert state4["skipped_steps"] == 1
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    resumed = launch(tmp_path, stage, "resume", tiny_assets)  # from checkpoint-2, the same fault at step 3
    for before, after in zip(saved, resumed):
        assert before["verdicts"]["3"] == after["verdicts"]["3"] == "SKIP"
        assert after["digests"]["3"] == before["digests"]["3"], "partitions and optimizer state resumed bit for bit"
        assert after["digests"]["4"] == before["digests"]["4"]
        assert after["counters"]["4"] == before["counters"]["4"], "DeepSpeed's counters resumed"
        assert after["skipped_steps"] == 1, "the skip count went on from the checkpoint's guard state"
        assert any(e[0] == "info" and "guard state restored" in e[3] for e in after["events"])


def test_zero3_stop_checkpoints_the_verified_partitions(tmp_path, tiny_assets):
    stopped = launch(tmp_path, "3", "stop", tiny_assets)
    guard_state = json.loads((tmp_path / "run" / "checkpoint-2" / "stabguard_state.json").read_text())
    assert guard_state["verified_step"] == 1, "the last state a PROCEED verified: the one after step 1"
    resumed = launch(tmp_path, "3", "after-stop", tiny_assets)
    for r, again in zip(stopped, resumed):
        assert not r["ok"] and r["stop_reason"].startswith("step 3")
        assert r["digests"]["3"] == r["digests"]["1"] != r["digests"]["2"], "the STOP restored the step-1 partitions"
        assert [(e[0], e[2]) for e in r["events"] if e[0] == "stop"] == [("stop", 3)]
        assert again["loaded"] == r["digests"]["1"], "the STOP's checkpoint holds those partitions"


def mixed_data(assets) -> Path:
    """The tiny set with a text-only conversation after each row (beside it: image paths are relative)."""
    path = Path(assets["train"]).with_name("mixed.jsonl")
    text_only = {"messages": [{"role": "user", "content": "Is copper conductive?"},
                              {"role": "assistant", "content": "Yes, the traces are copper."}]}
    rows = [line for line in Path(assets["train"]).read_text().splitlines() if line.strip()]
    path.write_text("".join(f"{row}\n{json.dumps(text_only)}\n" for row in rows))
    return path


def test_zero3_on_mixed_image_and_text_only_data_fails_and_the_placeholder_image_fixes_it(tmp_path, tiny_assets):
    """The ZeRO-3 failure `stabguard check` flags (QwenLM/Qwen3-VL#126): a rank whose batch is text-only
    skips the vision tower whose partitions the other ranks gather. DeepSpeed 0.19.8 on CPU detects it
    ("disagreement on list length"); on GPUs it is reported as a hang."""
    assets = {**tiny_assets, "train": mixed_data(tiny_assets)}
    recipe = tiny_recipe(assets, tmp_path / "run", training={"deepspeed": {"zero_optimization": {"stage": 3}},
                                                             "max_steps": 6})
    stabguard = Path(sys.executable).with_name("stabguard")  # as a user launches it: torchrun $(which stabguard)
    proc = torchrun(stabguard, "run", write_recipe(tmp_path / "mixed.toml", recipe), cwd=tmp_path, check=False,
                    what="stabguard run under torchrun, ZeRO-3 on mixed image and text-only data")
    assert proc.returncode != 0, "ZeRO-3 trained on mixed data without the fix: the preflight error may be stale"
    assert "text_only_image = true" in proc.stdout, f"the run names the fix:\n{proc.stdout[-3000:]}"
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    rank0, rank1 = launch(fixed, "3-textimage", "mixed", assets)
    for r in (rank0, rank1):
        assert r["ok"] and r["global_step"] == 6
        assert all(b["pixels"] for b in r["batches"]), "every micro-batch ran the vision tower"
    placed = [(a["placeholder"], b["placeholder"]) for a, b in zip(rank0["batches"], rank1["batches"])]
    assert any(a != b for a, b in placed), "the data did mix modalities across ranks within a step"


def test_an_engine_without_a_zero_optimizer_is_refused_with_a_pointer_to_ddp():
    """ZeRO stage 0 (DeepSpeed's plain or bf16 optimizer): recipes refuse it; GuardTrainer used directly too."""
    from stabguard import GuardError
    from stabguard.zero import ZeroEngine

    with pytest.raises(GuardError, match="ZeRO stage 0.*use DDP"):
        ZeroEngine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
