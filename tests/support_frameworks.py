"""The framework integration tests' shared parts: the tiny model with Qwen's real token ids, the synthetic
boards in each framework's dataset format, and what every guarded framework run must show.

Each test (tests/integrations/test_<framework>.py) runs the framework's own command line on the tiny
Qwen3-VL, with a NaN put into one LoRA gradient at step ``NAN_AT`` by ``stabguard.faults``, and checks
:func:`assert_guarded`: the step skipped and written to events.jsonl, the learning rate held for it, the
weights finite, and the mask guard's audit of the labels the framework built. On 2 ranks (``ON_RANK1``)
rank 1 alone gets a NaN gradient and an Inf loss: :func:`assert_both_ranks` and :func:`assert_loadable`
add what a multi-rank run must show; :func:`assert_resumed_like` compares a resumed run with one that
was not interrupted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stabguard.checkpoints import GUARD_STATE_FILE
from stabguard.data.export import image_tagged, typed_absolute
from stabguard.events import read_events

NAN_AT, STEPS = 3, 5
GUARDS = {"nonfinite": {}, "grad_norm": {}, "spike": {}, "mask": {}, "faults": {"nan_grad_at": [NAN_AT]}}
PLUGINS = ["stabguard.faults"]
# 2 ranks: rank 1 alone gets a NaN gradient (every rank's gradients turn NaN once reduced) and an Inf loss
# with finite gradients (only rank 1 sees it; every rank must still skip the step).
RANK_NAN_AT, RANK_INF_AT, RANK_STEPS = 2, 4, 6
ON_RANK1 = {"nonfinite": {}, "grad_norm": {}, "spike": {}, "mask": {},
            "faults": {"nan_grad_at": [RANK_NAN_AT], "inf_loss_at": [RANK_INF_AT], "ranks": [1]}}


def rows(assets) -> list[dict]:
    return [json.loads(line) for line in Path(assets["train"]).read_text().splitlines() if line.strip()]


def with_image_tags(assets, row: dict) -> dict:
    """The row as ms-swift and LLaMA-Factory read it (``stabguard data export --to ms-swift``)."""
    return image_tagged(row, Path(assets["train"]).parent)


def with_absolute_images(assets, row: dict) -> dict:
    """The row as Axolotl's multimodal chat_template reads it (``stabguard data export --to axolotl``)."""
    return typed_absolute(row, Path(assets["train"]).parent)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_guarded(output_dir: Path, adapter: Path, skipped=(NAN_AT,), steps: int = STEPS) -> list[dict]:
    """What every guarded run with non-finite steps ``skipped`` must show; returns the run's events."""
    events = read_events(Path(output_dir) / "events.jsonl")
    skips = [(e["guard"], e["step"]) for e in events if e["kind"] == "skip"]
    assert skips == [("nonfinite", s) for s in skipped], f"the steps {list(skipped)} and only they are skipped: {skips}"
    lrs = {e["step"]: e["values"]["learning_rate"] for e in events if e["kind"] == "log"}
    assert sorted(lrs) == list(range(1, steps + 1)), f"one log line per step: {sorted(lrs)}"
    # A linear schedule moves at every step but the skipped ones. Frameworks log the LR a step used (HF) or
    # the one after it (ms-swift), so the repeated value sits on either side of each skipped step.
    held = [(s, s + 1) for s in range(1, steps) if lrs[s] == lrs[s + 1]]
    assert held in ([(s - 1, s) for s in skipped], [(s, s + 1) for s in skipped]), \
        f"the skipped steps alone held the LR: {lrs}"
    assert all(lrs[s] >= lrs[s + 1] for s in range(1, steps)), f"a linear decay: {lrs}"
    weights = load_file(adapter)
    assert weights and all(math.isfinite(float(t.abs().sum())) for t in weights.values()), "the adapter is finite"
    audit = [e for e in events if e["guard"] == "mask" and "what the loss sees" in e["message"]]
    assert audit, "the mask guard audited the labels the framework built"
    return events


def assert_both_ranks(events: list[dict], world: int = 2) -> None:
    """One events.jsonl for the run: rank 0's copy of every decision, and what rank 1 alone saw (its own
    finding of the fault it got, at RANK_NAN_AT or RANK_INF_AT)."""
    ranks = sorted({e.get("rank") for e in events})
    assert ranks == list(range(world)), f"every rank wrote into the one events.jsonl: ranks {ranks}"
    assert {e.get("rank") for e in events if e["kind"] in ("skip", "log")} == {0}, "decisions once, by rank 0"
    own = [e for e in events if e.get("rank") == 1 and e["kind"] == "finding" and e["step"] in (RANK_NAN_AT, RANK_INF_AT)]
    assert own, "rank 1's own finding of its fault is in the shared events.jsonl"


def assert_loadable(adapter_dir: Path, base_model: Path) -> None:
    """peft loads the saved adapter onto the base model: every saved tensor has its parameter's shape (a
    ZeRO-3 save without gathering writes empty ones) and is finite, and the model holds those values."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    saved = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_model), str(adapter_dir))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and len(params) == len(saved), f"{len(saved)} tensors saved for {len(params)} LoRA parameters"
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        loaded = next((p for n, p in params.items() if n.endswith(key)), None)
        assert loaded is not None and loaded.shape == tensor.shape, f"{name}: saved {tuple(tensor.shape)}"
        assert torch.isfinite(tensor).all() and torch.equal(loaded.detach().cpu(), tensor), f"{name} loaded as saved"


def guard_state(checkpoint: Path) -> dict:
    """A checkpoint's stabguard_state.json without the id of the run that wrote it."""
    state = json.loads((Path(checkpoint) / GUARD_STATE_FILE).read_text())
    state.pop("run", None)
    return state


def assert_resumed_like(uninterrupted: Path, resumed: Path, resumed_events: list[dict]) -> None:
    """A run resumed from a checkpoint ends where the run that was never interrupted ended: the same guard
    counters, plugin states (the spike window), snapshot and recovery state, and the same adapter."""
    assert any(e["message"].startswith("guard state restored from") for e in resumed_events), \
        "the resumed run restored the guard state from its checkpoint"
    _same(guard_state(resumed), guard_state(uninterrupted), f"{Path(resumed).name}/{GUARD_STATE_FILE}")
    one = load_file(Path(uninterrupted) / "adapter_model.safetensors")
    other = load_file(Path(resumed) / "adapter_model.safetensors")
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _same(got, want, where: str) -> None:
    """Equal, floats within a relative 1e-4 (a resumed run's losses may differ in the last bits); a
    difference names its place."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, nan_ok=True), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def mask_findings(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["guard"] == "mask" and e["kind"] == "finding"]


def seam_present(owner: str, name: str) -> bool:
    """``owner.name`` exists: an attribute of the module or class, or one its classes assign in their code."""
    import importlib
    import inspect

    module_path, _, attr = owner.rpartition(".")
    try:
        found = getattr(importlib.import_module(owner), name, None) is not None  # owner is a module
        if found:
            return True
    except ImportError:
        pass
    holder = getattr(importlib.import_module(module_path), attr)
    if hasattr(holder, name):
        return True
    return inspect.isclass(holder) and any(f"self.{name} =" in inspect.getsource(c) for c in holder.__mro__
                                           if c.__module__.split(".")[0] == holder.__module__.split(".")[0])
