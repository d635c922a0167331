"""One rank of the two-rank CPU (gloo) run in tests/test_distributed.py; launched by torchrun.

usage: torchrun --nproc-per-node 2 tests/dist_worker.py MODEL_DIR TRAIN_JSONL OUT_DIR

Only rank 1 gets the faults, each of a kind that leaves the ranks' own views different:
- step 2: its loss is NaN while its gradients stay finite: rank 0 sees nothing wrong, so only the
  agreement across ranks makes it skip too;
- step 4: a NaN in one LoRA gradient (DDP's all-reduce spreads it; both ranks must skip);
- step 7: its loss spikes x50 (rank 0's loss is calm): both ranks must restore the same snapshot.
Each rank writes OUT_DIR/rank<r>.json: per-step verdicts and parameter digests, and its events.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from support import tiny_recipe, write_recipe
from support_faults import GradFault, LossFault, StepProbe, guard_plugins

from stabguard import hookimpl
from stabguard.runner import run

SPIKE = {"every": 2, "window": 5, "min_history": 3, "z": 8.0}


def digest(model) -> str:
    """A hash of every trainable parameter, bit for bit."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Digests(StepProbe):
    """StepProbe plus a digest of the trainable parameters at the end of every step."""

    def __init__(self):
        super().__init__()
        self.digests = {}

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        super().on_step_end(state)
        self.digests[state.step] = digest(state.model)


def main(model_dir: str, train: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    probe = Digests()
    faults = [LossFault(at={2}, value=float("nan"), rank=1), GradFault(at={4}, value=float("nan"), rank=1),
              LossFault(at={7}, scale=50.0, rank=1)]
    plugins = guard_plugins(*faults, probe)
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run",
                         training={"max_steps": 8, "ddp_find_unused_parameters": False},
                         guards={"spike": SPIKE})
    result = run(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=plugins)
    events = [e for e in result.trainer.events.events if e["kind"] in ("skip", "rollback", "stop")]
    report = {"rank": rank, "world_size": torch.distributed.get_world_size(), "ok": result.ok,
              "skipped_steps": result.skipped_steps, "verdicts": probe.verdicts, "digests": probe.digests,
              "lrs": probe.lrs, "events": [(e["kind"], e["guard"], e["step"]) for e in events]}
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
