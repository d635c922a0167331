"""One rank of the multi-process CPU (gloo) runs of the engine tests; launched by torchrun.

usage: torchrun --nproc-per-node N tests/engine_worker.py ENGINE MODEL_DIR TRAIN_JSONL OUT_DIR SCENARIO

ENGINE is the Trainer's own engine, for real: "ddp" (N=1: a single device), "fsdp2" (accelerate's
``fully_shard``, with only its accelerator-only gate lifted: ``lift_cpu_gate``), or "zero1" / "zero2" /
"zero3" (DeepSpeed's engine and ZeRO optimizer on its CPU accelerator). Options follow with dashes:
"-bf16" bf16 weights (fp32 masters), "-ga2" two micro-batches per optimizer step, "-offload" DeepSpeed's
optimizer in CPU memory, "-roundrobin" ZeRO-1/2's round_robin_gradients, "-textimage" data.text_only_image.

SCENARIO "faults": the faults hit the last rank only, each of a kind that leaves the ranks' views apart:
- step 2: a NaN in the backward pass at one LoRA B output (the engine's reduction then spreads it);
- step 4: its loss is NaN while its gradients stay finite (only the agreement makes the other ranks skip);
- step 7: its loss spikes x50: every rank restores its own part of the step-5 snapshot.
"save": 4 steps, checkpoints at 2 and 4, a NaN gradient at step 3. "resume": "save" resumed from its
step-2 checkpoint, the same fault at its first step (3); "resume-last": the same with ``--resume last`` (the
test damages checkpoint-4 first: the ranks must fall back to checkpoint-2 together). "stop": a guard stops the run at step 3.
"after-stop": "stop" resumed from its checkpoint. "mixed": 6 steps on image and text-only samples.
"post_collate" / "pre_step": a plugin raises in that hook on one rank only (rank 1 at its 3rd collated
batch / rank 0 at step 3). "heal" (``max_rollbacks = 1``, recovery on): the last rank's loss spikes x50
at step 4 in training only (a transient), and line 3 of the data spikes its own loss every time it is seen
from step 5 on (concentrated, on whichever rank trains it); on a sharded engine (no replay) the transient
recurs at 6 and 8 instead. "diverge": a divergence that lives in the weights (``Drift``), rewound alike on
every rank. Every other scenario runs with ``[recovery] enabled = false``. "cut": 2 steps with the gradient path cut after layer 0 (the first step's finding).
"probe": ``stabguard check --probe`` with the gradient path cut after layer 0 (every rank) and layer 1's
MLP output past fp16's range (the last rank only); "probe-num-items": the probe of a forward that ignores
num_items_in_batch. "functions" (fsdp2): no Trainer; ``fully_shard`` on a small MLP checks
stabguard.engine against the gathered tensors, with a NaN in rank 1's local gradient shard.

Each rank writes OUT_DIR/rank<r>_<scenario>.json: per step the verdicts, the guards' norm and the norm of
the full gradients, learning rates, and a digest of what this rank's optimizer steps (its local shards,
or its ZeRO partitions: fp32 masters, optimizer state, 16-bit weights); DeepSpeed's own counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from cpu_fsdp.sitecustomize import lift_cpu_gate
from support import tiny_recipe, write_recipe
from support_faults import (GUARDS, Amplify, CutPath, DropsNumItems, Drift, GradFault, LossFault, StepProbe,
                           StopAt, guard_plugins)

import stabguard.faults as faults_plugin
from stabguard import engine, hookimpl
from stabguard.data.jsonl import PLACEHOLDER_REF
from stabguard.runner import run

SPIKE = {"window": 5, "min_history": 3, "z": 8.0}
HEAL = {"spike": {**SPIKE, "max_rollbacks": 1}}
HEALING = {  # the recovery scenarios' recipe keys (recovery on)
    "heal": {"guards": {**HEAL, "faults": {"spike_samples": ["train.jsonl:3"], "spike_from": 5}}},
    "heal-sharded": {"guards": HEAL},
    "diverge": {"guards": {"divergence": {"window": 4}}, "snapshots": {"ring": 2, "ring_every": 3}},
}
FSDP = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                      "state_dict_type": "SHARDED_STATE_DICT"}}


def training_for(engine_name: str) -> dict:
    kind, *options = engine_name.split("-")
    training: dict = {"ddp_find_unused_parameters": False} if kind == "ddp" else {}
    if kind == "fsdp2":
        training.update(FSDP)
    if kind.startswith("zero"):
        config = {"zero_optimization": {"stage": int(kind[-1])}}
        if "offload" in options:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if "roundrobin" in options:  # LLaMA-Factory's ds_z2_config.json: DeepSpeed 0.19 mislinks the fragments
            config["zero_optimization"]["round_robin_gradients"] = True
        training["deepspeed"] = config  # stabguard fills in "auto" for what DeepSpeed requires
    if "bf16" in options:
        training["bf16"] = True
    if "ga2" in options:
        training.update(gradient_accumulation_steps=2, per_device_train_batch_size=1)
    return training


def digest(state) -> str:
    """A hash of what this rank's optimizer steps, bit for bit, with its optimizer state."""
    zero = getattr(state.model, "optimizer", None)
    if hasattr(zero, "bit16_groups_flat") or hasattr(zero, "fp32_partitioned_groups_flat"):  # DeepSpeed ZeRO
        stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
        masters = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
        tensors = [t for m in masters for t in [m, *_state_tensors(zero.optimizer, m)]]
        tensors += list(zero.fp16_partitioned_groups_flat if stage3 else zero.bit16_groups_flat)
    else:  # single device, DDP (the whole tensors), FSDP2 (this rank's local shards)
        tensors = [t for p in state.model.parameters() if p.requires_grad
                   for t in [p, *_state_tensors(state.optimizer, p)]]
    h = hashlib.sha256()
    for t in tensors:
        h.update(engine.local(t).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _state_tensors(optimizer, p) -> list[torch.Tensor]:
    return [v for _, v in sorted(optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]


def full_grad_norm(state) -> float:
    """The norm of the whole gradients, gathered the engine's own way (a check on the guards' norm)."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    if hasattr(state.model, "optimizer") and hasattr(state.model, "global_steps"):  # DeepSpeed's engine
        from deepspeed.utils import safe_get_full_grad

        grads = [safe_get_full_grad(p) for p in params]
    else:
        grads = [p.grad.full_tensor() if engine.is_sharded(p.grad) else p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads if g is not None])).item()


class EngineProbe(StepProbe):
    """StepProbe plus, per step: the full gradients' norm, the digest, and DeepSpeed's own counters."""

    def __init__(self):
        super().__init__()
        self.digests, self.full_norms, self.sharded, self.counters, self.stale = {}, {}, {}, {}, {}
        self.batches: list[dict] = []
        self.loaded: str | None = None

    @hookimpl(trylast=True)
    def pre_step(self, state):
        super().pre_step(state)
        if self.loaded is None:  # before this run's first update (what a resume loaded)
            self.loaded = digest(state)
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self.sharded[state.step] = bool(grads) and all(engine.is_sharded(g) for g in grads)
        self.full_norms[state.step] = full_grad_norm(state)

    @hookimpl
    def post_collate(self, batch, samples):
        """Per micro-batch: did it reach the model with pixels, and did any come from a placeholder."""
        placed = any(item.get("image") == PLACEHOLDER_REF for s in samples for m in s["messages"]
                     if isinstance(m.get("content"), list) for item in m["content"])
        self.batches.append({"pixels": "pixel_values" in batch, "placeholder": placed})

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        super().on_step_end(state)
        self.digests[state.step] = digest(state)
        if hasattr(state.model, "global_steps"):
            self.counters[state.step] = {"global_steps": state.model.global_steps,
                                         "skipped_steps": state.model.skipped_steps}
            self.stale[state.step] = stale_weights(state.model)


def stale_weights(deepspeed_engine) -> int:
    """Trainable weights the model would read (ZeRO-1/2: all; ZeRO-3: the gathered ones) that differ from
    their fp32 masters in the weights' dtype: 0 when the model reads what the optimizer holds."""
    from deepspeed.utils import safe_get_full_fp32_param

    stale = 0
    for p in deepspeed_engine.parameters():
        if p.requires_grad:
            master = safe_get_full_fp32_param(p)  # a collective: every rank, every parameter, in order
            stale += p.numel() > 0 and not torch.equal(p.detach(), master.to(p.dtype))
    return stale


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


def scenario(name: str, out: Path, last: int, ga: int, per_epoch: int):
    """(plugins, training overrides, resume). Faults count micro-batches: a step's fault hits its first
    one. With ``ga`` micro-batches per step and ``per_epoch`` per rank and epoch, the last step of an
    epoch may have fewer (3 per epoch, 2 per step: steps of 2, 1, 2, 1, ...)."""
    steps_per_epoch = -(-per_epoch // ga)

    def first(step: int) -> set[int]:
        epoch, j = divmod(step - 1, steps_per_epoch)
        return {epoch * per_epoch + j * ga + 1}

    nan_grad = lambda at: GradFault(at=at, value=float("nan"), rank=last, where="output")  # noqa: E731
    save = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2}
    return {
        "faults": lambda: ([nan_grad(first(2)), LossFault(at=first(4), value=float("nan"), rank=last),
                            LossFault(at=first(7), scale=50.0 * ga, rank=last)], {"max_steps": 8}, None),
        "save": lambda: ([nan_grad({3})], save, None),
        "resume": lambda: ([nan_grad({1})], save, str(out / "run" / "checkpoint-2")),
        "resume-last": lambda: ([nan_grad({1})], save, "last"),
        "stop": lambda: ([StopAt(3)], {"max_steps": 5}, None),
        "after-stop": lambda: ([], {"max_steps": 3}, str(out / "run" / "checkpoint-2")),
        "mixed": lambda: ([], {"max_steps": 6}, None),
        "post_collate": lambda: ([RaisesInPostCollate(rank=1, at=3)], {"max_steps": 8}, None),
        "pre_step": lambda: ([RaisesInPreStep(rank=0, at=3)], {"max_steps": 8}, None),
        "cut": lambda: ([CutPath()], {"max_steps": 2}, None),
        "heal": lambda: ([LossFault(at=first(4), scale=50.0 * ga, rank=last), faults_plugin], {"max_steps": 9}, None),
        "heal-sharded": lambda: ([LossFault(at=first(4) | first(6) | first(8), scale=50.0 * ga, rank=last)],
                                 {"max_steps": 9}, None),
        "diverge": lambda: ([Drift()], {"max_steps": 16, "learning_rate": 1e-2, "max_grad_norm": 0.0}, None),
    }[name]()


def functions_checks() -> dict:
    """``fully_shard`` on a small MLP, no Trainer: the engine functions against the gathered tensors."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same initial weights on both ranks
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    for layer in (net[0], net[2], net):
        fully_shard(layer)
    torch.manual_seed(1 + int(os.environ["RANK"]))  # each rank its own batch
    net(torch.randn(5, 8)).square().sum().backward()
    params = list(net.parameters())
    full = lambda: torch.linalg.vector_norm(torch.cat([p.grad.full_tensor().flatten() for p in params]))  # noqa: E731
    out = {"sharded": all(engine.is_sharded(p.grad) for p in params),
           "norm": engine.grad_norm(params).item(), "full_norm": full().item()}
    engine.clip_with_norm(params, 0.5, engine.grad_norm(params))
    out["clipped_full_norm"] = full().item()
    kept = [engine.Kept(p, offload=True) for p in params]
    before = [engine.local(p).clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    out["restored_same_object"] = all(k.into(p) is p for k, p in zip(kept, params))
    out["restored_bitwise"] = all(torch.equal(engine.local(p), b) for p, b in zip(params, before))
    if int(os.environ["RANK"]) == 1:  # a NaN in rank 1's local shard only
        engine.local(params[0].grad).view(-1)[0] = float("nan")
    out["local_finite"] = all(torch.isfinite(engine.local(p.grad)).all().item() for p in params)
    out["nan_norm"] = engine.grad_norm(params).item()
    return out


PROBE_FAULTS = {  # each rank's findings must be the same: the faults hit one rank, or every rank alike
    "probe": lambda last: [CutPath(), Amplify("language_model.layers.1.mlp.down_proj", rank=last)],
    "probe-num-items": lambda last: [DropsNumItems()],
}


def probe_check(training: dict, model_dir: str, train: str, out: Path, rank: int, world: int) -> None:
    """``stabguard check --probe`` on this rank (the "probe" scenarios): every rank writes its probe findings."""
    from stabguard.check import preflight

    name = sys.argv[5]
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run", training=training)
    plugins = guard_plugins(*PROBE_FAULTS[name](world - 1), guards=("vision_freeze", "nonfinite", "grad_norm"))
    report = preflight(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=plugins, probe_batches=2)
    findings = [{"check": f.check, "level": f.level, "message": f.message, "details": f.details, "values": f.values,
                 "guard": f.guard} for f in report.findings if f.check.startswith("probe")]
    (out / f"rank{rank}_{name}.json").write_text(json.dumps({"rank": rank, "findings": findings}, indent=1))
    close_process_group()


def close_process_group() -> None:
    """Every rank has written its report; end without the interpreter's teardown, where gloo's threads
    sometimes abort a finished rank ("terminate called without an active exception", seen under tox)."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(engine_name: str, model_dir: str, train: str, out_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), Path(out_dir)
    if name == "functions":
        torch.distributed.init_process_group("gloo")
        Path(out_dir, f"rank{rank}_functions.json").write_text(json.dumps(functions_checks(), indent=1))
        close_process_group()
    if engine_name.startswith("fsdp2"):
        lift_cpu_gate()
    training = training_for(engine_name)
    if name.startswith("probe"):
        probe_check(training, model_dir, train, out, rank, world)
    rows = sum(1 for line in Path(train).read_text().splitlines() if line.strip())
    plugins, overrides, resume = scenario(name, out, last=world - 1, ga=training.get("gradient_accumulation_steps", 1),
                                          per_epoch=-(-rows // world))
    probe = EngineProbe()
    data = {"text_only_image": True} if "textimage" in engine_name.split("-") else {}
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run",
                         training={**training, **overrides}, data=data, **HEALING.get(name, {"recovery": {"enabled": False},
                                                                                           "guards": {"spike": SPIKE}}))
    guards = (*GUARDS, *(g for g in HEALING.get(name, {}).get("guards", {}) if g not in GUARDS and g != "faults"))
    result = run(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=guard_plugins(*plugins, probe, guards=guards),
                 resume=resume)
    trainer = result.trainer
    adapter = {n: float(t.double().sum()) for n, t in engine.gathered_trainable(trainer.model).items()}
    kinds = ("skip", "rollback", "stop", "info", "remedy", "finding", "diagnosis")
    events = [e for e in trainer.events.events if e["kind"] in kinds]
    report = {"rank": rank, "world_size": world, "ok": result.ok, "error": result.error, "run": result.run_id,
              "stop_reason": result.stop_reason, "global_step": result.global_step,
              "dropped_steps": result.dropped_steps, "skipped_steps": result.skipped_steps,
              "fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled,
              "zero": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
              "verdicts": probe.verdicts, "digests": probe.digests, "norms": probe.norms,
              "full_norms": probe.full_norms, "sharded": probe.sharded, "lrs": probe.lrs,
              "counters": probe.counters, "stale": probe.stale, "loaded": probe.loaded, "batches": probe.batches,
              "adapter_sums": adapter, "recovery": trainer.guarded.recovery.state_dict(),
              "events": [(e["kind"], e["guard"], e["step"], e["message"]) for e in events],
              "remedies": [e["values"] for e in events if e["kind"] == "remedy"],
              "diagnoses": {e["step"]: e["values"] for e in events if e["kind"] == "diagnosis"}}
    (out / f"rank{rank}_{name}.json").write_text(json.dumps(report, indent=1))
    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
