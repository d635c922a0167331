"""FSDP2 on two CPU ranks (gloo, torchrun): the guarded step on sharded parameters, for real.

tests/fsdp_worker.py runs the Trainer's own FSDP2 path (``training.fsdp = true``, fsdp_config
version 2) with only accelerate's accelerator-only gate lifted, or ``fully_shard`` on a small MLP for the
engine functions. Faults hit rank 1 only. Each launch takes 5-15 s on 2 cores; a hang fails at the timeout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist
from support_launch import torchrun

from stabguard.seams import fsdp2_accelerate_problem

WORKER = Path(__file__).with_name("fsdp_worker.py")

pytestmark = [pytest.mark.engines, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with the gloo backend and torchrun",
)]


def launch(out: Path, scenario: str, assets=None) -> list[dict]:
    model, train = (assets["model"], assets["train"]) if assets else ("-", "-")
    torchrun(WORKER, model, train, out, scenario, what=f"FSDP2 '{scenario}' on 2 ranks (tests/fsdp_worker.py)")
    return [json.loads((out / f"rank{r}_{scenario}.json").read_text()) for r in (0, 1)]


def test_engine_norm_clip_and_restore_on_fully_sharded_gradients(tmp_path):
    rank0, rank1 = launch(tmp_path, "engine")
    for r in (rank0, rank1):
        assert r["sharded"], "the gradients must be DTensors for this test to mean anything"
        assert r["norm"] == pytest.approx(r["full_norm"], rel=1e-6), "the norm of the unsharded gradients"
        assert r["clipped_full_norm"] == pytest.approx(0.5, rel=1e-5), "clipped on the shards to the global max"
        assert r["restored_same_object"] and r["restored_bitwise"], "a snapshot restores the shards in place, bit for bit"
        assert math.isnan(r["nan_norm"]), "a NaN in rank 1's shard makes the norm NaN on every rank"
    assert rank0["norm"] == rank1["norm"], "one collective: the same value on every rank"
    assert rank0["local_finite"] and not rank1["local_finite"], "rank 0 holds no NaN itself"


needs_accelerate = pytest.mark.skipif(fsdp2_accelerate_problem() is not None, reason=str(fsdp2_accelerate_problem()))


@needs_accelerate
def test_trainer_fsdp2_faults_on_one_rank_are_decided_alike_on_both(tmp_path, tiny_assets):
    rank0, rank1 = launch(tmp_path, "faults", tiny_assets)
    for r in (rank0, rank1):
        assert r["fsdp"] and all(r["sharded"].values()), "the Trainer ran FSDP2: DTensor gradients every step"
        assert r["ok"] and r["global_step"] == 8
        assert r["verdicts"] == rank0["verdicts"]
        for step, norm in r["norms"].items():  # the guards' norm is the unsharded one, on both ranks
            assert norm == rank0["norms"][step] or math.isnan(norm) and math.isnan(rank0["norms"][step])
            assert math.isnan(norm) == math.isnan(r["full_norms"][step])
            assert math.isnan(norm) or norm == pytest.approx(r["full_norms"][step], rel=1e-5)
        digests, lrs = r["digests"], r["lrs"]
        assert digests["2"] == digests["1"] and digests["4"] == digests["3"], "a skip changes no shard and no state"
        assert digests["7"] == digests["5"] != digests["6"], "the rollback restores this rank's shards of step 5"
        assert lrs["3"] == lrs["2"] and lrs["5"] == lrs["4"], "a skipped step holds the LR scheduler"
        assert [(e[0], e[2]) for e in r["events"] if e[0] in ("skip", "rollback")] == [
            ("skip", 2), ("skip", 4), ("rollback", 7)]
    assert {s: v for s, v in rank0["verdicts"].items() if v != "PROCEED"} == {
        "2": "SKIP", "4": "SKIP", "7": "ROLLBACK"}, "rank 1's NaN gradient, its NaN loss, its loss spike"
    assert rank0["digests"]["1"] != rank1["digests"]["1"], "each rank holds its own shard"


@needs_accelerate
def test_trainer_fsdp2_checkpoint_resumes_shards_and_guard_state(tmp_path, tiny_assets):
    saved = launch(tmp_path, "save", tiny_assets)
    state4 = json.loads((tmp_path / "run" / "checkpoint-4" / "stabguard_state.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    resumed = launch(tmp_path, "resume", tiny_assets)  # from checkpoint-2, the same fault at step 3
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
