"""DeepSpeed ZeRO on two CPU ranks (gloo, torchrun): checkpoints, a STOP's verified partitions, mixed
image and text-only data, and what stabguard refuses. DeepSpeed runs on this CPU as it is.

tests/engine_worker.py runs the Trainer's own DeepSpeed path; the fault scenario every engine shares
(each ZeRO stage, bf16, accumulation, CPU offload) is in tests/test_engines.py. Each launch takes about
10 s on 2 cores; DeepSpeed's CPU ops are built before the first one (the ``deepspeed_cpu_ops`` fixture).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support import tiny_recipe, write_recipe
from support_launch import engine_run, torchrun

pytestmark = [
    pytest.mark.engines,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo"),
    pytest.mark.usefixtures("deepspeed_cpu_ops"),
]


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_checkpoint_resumes_partitions_and_guard_state(tmp_path, tiny_assets, stage):
    saved = engine_run(tmp_path, f"zero{stage}", "save", tiny_assets)
    state4 = json.loads((tmp_path / "run" / "checkpoint-4" / "stabguard_state.json").read_text())
    assert state4["skipped_steps"] == 1
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    resumed = engine_run(tmp_path, f"zero{stage}", "resume", tiny_assets)  # from checkpoint-2, the same fault at step 3
    for before, after in zip(saved, resumed):
        assert before["verdicts"]["3"] == after["verdicts"]["3"] == "SKIP"
        assert after["digests"]["3"] == before["digests"]["3"], "partitions and optimizer state resumed bit for bit"
        assert after["digests"]["4"] == before["digests"]["4"]
        assert after["counters"]["4"] == before["counters"]["4"], "DeepSpeed's counters resumed"
        assert after["skipped_steps"] == 1, "the skip count went on from the checkpoint's guard state"
        assert any(e[0] == "info" and "guard state restored" in e[3] for e in after["events"])


def test_a_zero_checkpoint_with_one_ranks_partition_damaged_is_passed_over(tmp_path, tiny_assets):
    """ZeRO-2: the manifest lists both ranks' optimizer partitions; rank 1's is rewritten in place (same
    size, other bytes): --resume last names it and both ranks resume from checkpoint-2, bit for bit."""
    from stabguard.checkpoints import MANIFEST_FILE, verify

    saved = engine_run(tmp_path, "zero2", "save", tiny_assets)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    partitions = sorted(name for name in listed if "optim_states" in name)
    assert [name.rsplit("/", 1)[1][:16] for name in partitions] == ["zero_pp_rank_0_m", "zero_pp_rank_1_m"], partitions
    rank1 = checkpoint / partitions[1]
    rank1.write_bytes(bytes(rank1.stat().st_size))  # bit rot: the size is right, the bytes are not
    assert verify(checkpoint).status == "damaged"
    resumed = engine_run(tmp_path, "zero2", "resume-last", tiny_assets)
    for before, after in zip(saved, resumed):
        said = [e[3] for e in after["events"]]
        assert any(f"{partitions[1]} has the manifest's size but not its content" in m for m in said), said
        assert any(m.endswith("checkpoint-2 (the newest that verifies)") for m in said), said
        assert after["digests"]["4"] == before["digests"]["4"] and after["counters"]["4"] == before["counters"]["4"]


def test_zero3_stop_checkpoints_the_verified_partitions(tmp_path, tiny_assets):
    stopped = engine_run(tmp_path, "zero3", "stop", tiny_assets)
    guard_state = json.loads((tmp_path / "run" / "checkpoint-2" / "stabguard_state.json").read_text())
    assert guard_state["verified_step"] == 1, "the last state a PROCEED verified: the one after step 1"
    resumed = engine_run(tmp_path, "zero3", "after-stop", tiny_assets)
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
    rank0, rank1 = engine_run(fixed, "zero3-textimage", "mixed", assets)
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
