"""One rank of the DeepSpeed ZeRO CPU runs in tests/test_deepspeed.py; launched by torchrun.

usage: torchrun --nproc-per-node N tests/deepspeed_worker.py STAGE MODEL_DIR TRAIN_JSONL OUT_DIR SCENARIO

The run is ``stabguard.runner.run`` with ``training.deepspeed`` set to a ZeRO-STAGE config: the Trainer's
own DeepSpeed path (accelerate's ``DeepSpeedEngineWrapper``, DeepSpeed's engine and ZeRO optimizer, its
CPU accelerator and gloo). Nothing is imitated: DeepSpeed runs on this CPU as it is.

SCENARIO "faults": the faults hit the last rank only:
- step 2: a NaN in the backward pass at one LoRA B output (the ZeRO reduction then spreads it);
- step 4: its loss is NaN while its gradients stay finite (only the agreement makes the other rank skip);
- step 7: its loss spikes x50: every rank restores its own partitions of the step-5 snapshot.
SCENARIO "save": 4 steps, checkpoints at steps 2 and 4, a NaN gradient at step 3 (one skip).
SCENARIO "resume": resumes "save" from its step-2 checkpoint, with the same fault at its first step (3).
SCENARIO "stop": a guard stops the run at step 3: its checkpoint-2 holds the verified state (after step 1).
SCENARIO "after-stop": resumes "stop" from that checkpoint.
SCENARIO "mixed": 6 steps, no fault, on a TRAIN_JSONL that mixes image and text-only samples.
Each rank writes OUT_DIR/rank<r>_<scenario>.json: per step the guards' norm and the norm of the full
gradients as DeepSpeed's ``safe_get_full_grad`` gives them, verdicts, learning rates, DeepSpeed's own
counters and a digest of this rank's ZeRO partitions (fp32 masters, optimizer state, 16-bit weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from fsdp_worker import OutputGradFault, close_process_group
from support import tiny_recipe, write_recipe
from support_faults import LossFault, StepProbe, StopAt, guard_plugins

from stabguard import hookimpl
from stabguard.data.jsonl import PLACEHOLDER_REF
from stabguard.runner import run
from stabguard.zero import zero_optimizer

SPIKE = {"window": 5, "min_history": 3, "z": 8.0}


def deepspeed_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}


def training_for(stage: str) -> dict:
    """STAGE is 1, 2 or 3, then options: "-bf16" bf16 weights (fp32 masters), as 32B runs train; "-ga2" two
    micro-batches per optimizer step; "-offload" the optimizer (fp32 masters and state) in CPU memory;
    "-textimage" (read in ``main``) sets data.text_only_image."""
    zero, *options = stage.split("-")
    config = deepspeed_config(int(zero))
    training = {"deepspeed": config}
    if "bf16" in options:
        training["bf16"] = True
    if "ga2" in options:
        training.update(gradient_accumulation_steps=2, per_device_train_batch_size=1)
    if "offload" in options:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return training


def digest(zero) -> str:
    """A hash of this rank's ZeRO partitions: fp32 masters, their optimizer state and the 16-bit weights."""
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    masters = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
    weights = zero.fp16_partitioned_groups_flat if stage3 else zero.bit16_groups_flat
    h = hashlib.sha256()
    for master in masters:
        state = zero.optimizer.state.get(master, {})
        for t in [master, *[v for _, v in sorted(state.items()) if torch.is_tensor(v)]]:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for t in weights:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ZeroProbe(StepProbe):
    """StepProbe plus, per step, the norm of the full gradients, the digest and DeepSpeed's counters."""

    def __init__(self):
        super().__init__()
        self.digests, self.full_norms, self.counters, self.stale = {}, {}, {}, {}
        self.loaded: str | None = None
        self.batches: list[dict] = []

    @hookimpl(trylast=True)
    def pre_step(self, state):
        super().pre_step(state)
        from deepspeed.utils import safe_get_full_grad

        if self.loaded is None:  # before this run's first update
            self.loaded = digest(state.model.optimizer)
        grads = [safe_get_full_grad(p) for p in state.model.parameters() if p.requires_grad]
        self.full_norms[state.step] = torch.linalg.vector_norm(
            torch.cat([g.float().flatten() for g in grads if g is not None])).item()

    @hookimpl
    def post_collate(self, batch, samples):
        """Per micro-batch: did it reach the model with pixels, and did any came from a placeholder."""
        placed = any(item.get("image") == PLACEHOLDER_REF for s in samples for m in s["messages"]
                     if isinstance(m.get("content"), list) for item in m["content"])
        self.batches.append({"pixels": "pixel_values" in batch, "placeholder": placed})

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        super().on_step_end(state)
        engine = state.model
        self.digests[state.step] = digest(engine.optimizer)
        self.counters[state.step] = {"global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps}
        self.stale[state.step] = stale_weights(engine)


def stale_weights(engine) -> int:
    """Trainable weights the model would read (ZeRO-1/2: all; ZeRO-3: the gathered ones) that differ from
    their fp32 masters in the weights' dtype: 0 when the model reads what the optimizer holds."""
    from deepspeed.utils import safe_get_full_fp32_param

    stale = 0
    for p in engine.parameters():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)  # a collective: every rank, every parameter, in order
            stale += p.numel() > 0 and not torch.equal(p.detach(), master.to(p.dtype))
    return stale


def scenario(name: str, out: Path, last: int, ga: int = 1, per_epoch: int = 1):
    """(fault plugins, training overrides, resume). Faults count micro-batches: a step's fault hits its
    first one. With ``ga`` micro-batches per step and ``per_epoch`` per rank and epoch, the last step of
    an epoch may have fewer (3 per epoch, 2 per step: steps of 2, 1, 2, 1, ...)."""
    if name == "faults":
        steps_per_epoch = -(-per_epoch // ga)

        def first(step: int) -> set[int]:
            epoch, j = divmod(step - 1, steps_per_epoch)
            return {epoch * per_epoch + j * ga + 1}

        return ([OutputGradFault(at=first(2), value=float("nan"), rank=last),
                 LossFault(at=first(4), value=float("nan"), rank=last),
                 LossFault(at=first(7), scale=50.0 * ga, rank=last)], {"max_steps": 8}, None)
    if name == "stop":
        return [StopAt(3)], {"max_steps": 5}, None
    if name == "mixed":  # TRAIN_JSONL mixes image and text-only samples
        return [], {"max_steps": 6}, None
    if name == "after-stop":
        return [], {"max_steps": 3}, str(out / "run" / "checkpoint-2")
    save = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2}
    if name == "save":
        return [OutputGradFault(at={3}, value=float("nan"), rank=last)], save, None
    return [OutputGradFault(at={1}, value=float("nan"), rank=last)], save, str(out / "run" / "checkpoint-2")


def main(stage: str, model_dir: str, train: str, out_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    rank, out = int(os.environ["RANK"]), Path(out_dir)
    zero_training = training_for(stage)
    world = int(os.environ["WORLD_SIZE"])
    rows = sum(1 for line in Path(train).read_text().splitlines() if line.strip())
    faults, training, resume = scenario(name, out, last=world - 1, ga=zero_training.get("gradient_accumulation_steps", 1),
                                        per_epoch=-(-rows // world))
    probe = ZeroProbe()
    plugins = guard_plugins(*faults, probe)
    data = {"text_only_image": True} if "textimage" in stage.split("-") else {}
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run",
                         training={**zero_training, **training}, guards={"spike": SPIKE}, data=data)
    result = run(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=plugins, resume=resume)
    trainer = result.trainer
    events = [e for e in trainer.events.events if e["kind"] in ("skip", "rollback", "stop", "info")]
    report = {"rank": rank, "world_size": torch.distributed.get_world_size(), "ok": result.ok,
              "deepspeed": trainer.is_deepspeed_enabled, "zero": type(zero_optimizer(trainer)).__name__,
              "global_step": result.global_step, "skipped_steps": result.skipped_steps,
              "verdicts": probe.verdicts, "digests": probe.digests, "norms": probe.norms,
              "full_norms": probe.full_norms, "lrs": probe.lrs, "counters": probe.counters, "stale": probe.stale, "loaded": probe.loaded,
              "batches": probe.batches,
              "stop_reason": trainer.stop_reason,
              "events": [(e["kind"], e["guard"], e["step"], e["message"]) for e in events]}
    (out / f"rank{rank}_{name}.json").write_text(json.dumps(report, indent=1))
    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
