"""FSDP2 on two CPU ranks (gloo, torchrun): the engine functions on sharded gradients, and a sharded run's
checkpoint, resume and final adapter.

tests/engine_worker.py runs the Trainer's own FSDP2 path (``training.fsdp = true``, fsdp_config version 2)
with only accelerate's accelerator-only gate lifted, or ``fully_shard`` on a small MLP for the engine
functions. The fault scenario every engine shares is in tests/test_engines.py. Each launch takes 5-15 s on
2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from support_launch import engine_run

from stabguard.seams import fsdp2_accelerate_problem

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)]


def test_engine_norm_clip_and_restore_on_fully_sharded_gradients(tmp_path):
    rank0, rank1 = engine_run(tmp_path, "fsdp2", "functions")
    for r in (rank0, rank1):
        assert r["sharded"], "the gradients must be DTensors for this test to mean anything"
        assert r["norm"] == pytest.approx(r["full_norm"], rel=1e-6), "the norm of the unsharded gradients"
        assert r["clipped_full_norm"] == pytest.approx(0.5, rel=1e-5), "clipped on the shards to the global max"
        assert r["restored_same_object"] and r["restored_bitwise"], "a snapshot restores the shards in place, bit for bit"
        assert math.isnan(r["nan_norm"]), "a NaN in rank 1's shard makes the norm NaN on every rank"
    assert rank0["norm"] == rank1["norm"], "one collective: the same value on every rank"
    assert rank0["local_finite"] and not rank1["local_finite"], "rank 0 holds no NaN itself"


@pytest.mark.skipif(fsdp2_accelerate_problem() is not None, reason=str(fsdp2_accelerate_problem()))
def test_trainer_fsdp2_checkpoint_resumes_shards_and_guard_state(tmp_path, tiny_assets):
    saved = engine_run(tmp_path, "fsdp2", "save", tiny_assets)
    state4 = json.loads((tmp_path / "run" / "checkpoint-4" / "stabguard_state.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    resumed = engine_run(tmp_path, "fsdp2", "resume", tiny_assets)  # from checkpoint-2, the same fault at step 3
    for before, after in zip(saved, resumed):
        assert before["verdicts"]["3"] == after["verdicts"]["3"] == "SKIP"
        assert after["digests"]["3"] == before["digests"]["3"], "sharded weights and optimizer state resumed bit for bit"
        assert after["digests"]["4"] == before["digests"]["4"] and after["lrs"] == {s: before["lrs"][s] for s in "34"}
        assert any("guard state restored" in e[3] for e in after["events"])
    assert_final_adapter(tmp_path / "run", tiny_assets, resumed)
    again = json.loads((tmp_path / "run" / "checkpoint-4" / "stabguard_state.json").read_text())
    assert state4["skipped_steps"] == again["skipped_steps"] == 1
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in state4.items() if k != "run"}, (
        "the guards' state after resuming equals the uninterrupted run's")


@pytest.mark.skipif(fsdp2_accelerate_problem() is not None, reason=str(fsdp2_accelerate_problem()))
def test_a_sharded_checkpoint_with_one_ranks_shard_damaged_is_passed_over(tmp_path, tiny_assets):
    """The manifest lists every rank's shards (written once, after all ranks wrote); rank 1's model shard of
    checkpoint-4 is cut: --resume last names it and both ranks resume from checkpoint-2, bit for bit."""
    from stabguard.checkpoints import MANIFEST_FILE, verify

    saved = engine_run(tmp_path, "fsdp2", "save", tiny_assets)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    shards = sorted(name for name in listed if name.endswith(".distcp"))
    assert {name.rsplit("/", 1)[1] for name in shards} >= {"__0_0.distcp", "__1_0.distcp"}, shards
    rank1 = next(checkpoint / name for name in shards if name.endswith("__1_0.distcp"))
    with open(rank1, "r+b") as f:
        f.truncate(rank1.stat().st_size // 2)
    assert verify(checkpoint).status == "damaged"
    resumed = engine_run(tmp_path, "fsdp2", "resume-last", tiny_assets)
    for before, after in zip(saved, resumed):
        said = [e[3] for e in after["events"]]
        assert any(rank1.relative_to(checkpoint).as_posix() in m and m.endswith("skipped") for m in said), said
        assert any(m.endswith("checkpoint-2 (the newest that verifies)") for m in said), said
        assert after["digests"]["3"] == before["digests"]["3"] and after["digests"]["4"] == before["digests"]["4"]
    assert verify(checkpoint).status == "verified", "step 4 saved again, every rank's shard listed"


def assert_final_adapter(output_dir: Path, assets, reports: list[dict]) -> None:
    """The end of a sharded run leaves the whole adapter in output_dir, as every other engine does: it loads
    with PeftModel.from_pretrained and holds the weights the ranks' shards gathered to."""
    import torch
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    assert (output_dir / "adapter_model.safetensors").exists(), "the final adapter was written"
    base = Qwen3VLForConditionalGeneration.from_pretrained(assets["model"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, output_dir)
    sums = {n: float(p.double().sum()) for n, p in loaded.named_parameters() if "lora_" in n}
    assert sums.keys() == reports[0]["adapter_sums"].keys() == reports[1]["adapter_sums"].keys()
    for name, value in sums.items():
        assert value == pytest.approx(reports[0]["adapter_sums"][name], rel=1e-6, abs=1e-9), name
