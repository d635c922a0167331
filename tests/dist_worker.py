"""One rank of the two-rank CPU (gloo) runs in tests/test_distributed.py; launched by torchrun.

usage: torchrun --nproc-per-node 2 tests/dist_worker.py MODEL_DIR TRAIN_JSONL OUT_DIR [SCENARIO]

SCENARIO "faults" (the default): only rank 1 gets the faults, each of a kind that leaves the ranks' own
views different:
- step 2: its loss is NaN while its gradients stay finite: rank 0 sees nothing wrong, so only the
  agreement across ranks makes it skip too;
- step 4: a NaN in one LoRA gradient (DDP's all-reduce spreads it; both ranks must skip);
- step 7: its loss spikes x50 (rank 0's loss is calm): both ranks must restore the same snapshot.
SCENARIO "post_collate" / "pre_step": a plugin raises in that hook on one rank only (rank 1 at its 3rd
collated batch / rank 0 at step 3): both ranks must stop at once with the same reason.
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
from fsdp_worker import close_process_group
from support_faults import GradFault, LossFault, StepProbe, guard_plugins

from stabguard import hookimpl
from stabguard.runner import run

SPIKE = {"window": 5, "min_history": 3, "z": 8.0}


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


class RaisesIn:
    """A third-party plugin with a bug that shows on one rank only, at the ``at``-th call of a hook."""

    def __init__(self, rank: int, at: int):
        self.rank, self.at, self.calls = rank, at, 0

    def maybe_raise(self):
        self.calls += 1
        if self.calls == self.at and int(os.environ["RANK"]) == self.rank:
            raise ValueError(f"a bug on rank {self.rank}")


class RaisesInPostCollate(RaisesIn):
    @hookimpl
    def post_collate(self):
        self.maybe_raise()


class RaisesInPreStep(RaisesIn):
    @hookimpl
    def pre_step(self):
        self.maybe_raise()


SCENARIOS = {
    "faults": lambda: [LossFault(at={2}, value=float("nan"), rank=1), GradFault(at={4}, value=float("nan"), rank=1),
                       LossFault(at={7}, scale=50.0, rank=1)],
    "post_collate": lambda: [RaisesInPostCollate(rank=1, at=3)],
    "pre_step": lambda: [RaisesInPreStep(rank=0, at=3)],
}


def main(model_dir: str, train: str, out_dir: str, scenario: str = "faults") -> None:
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    probe = Digests()
    faults = SCENARIOS[scenario]()
    plugins = guard_plugins(*faults, probe)
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run",
                         training={"max_steps": 8, "ddp_find_unused_parameters": False},
                         guards={"spike": SPIKE})
    result = run(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=plugins)
    events = [e for e in result.trainer.events.events if e["kind"] in ("skip", "rollback", "stop")]
    report = {"rank": rank, "world_size": torch.distributed.get_world_size(), "ok": result.ok,
              "stop_reason": result.stop_reason, "error": result.error, "run": result.run_id,
              "dropped_steps": result.dropped_steps, "verdicts": probe.verdicts, "digests": probe.digests,
              "lrs": probe.lrs, "events": [(e["kind"], e["guard"], e["step"]) for e in events]}
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
