"""One rank of the two-rank FSDP2 CPU (gloo) runs in tests/test_fsdp.py; launched by torchrun.

usage: torchrun --nproc-per-node 2 tests/fsdp_worker.py MODEL_DIR TRAIN_JSONL OUT_DIR SCENARIO

The run is ``stabguard.runner.run`` with ``training.fsdp = true`` and ``fsdp_config.version = 2``:
the Trainer's own FSDP2 path (accelerate's ``fully_shard`` of the model, DTensor parameters, gradients
and optimizer state). accelerate turns FSDP on only for accelerator device types; ``lift_cpu_gate``
lifts that one check in this process, and nothing else is imitated.

SCENARIO "faults": only rank 1 gets the faults:
- step 2: a NaN in the backward pass at one LoRA B output (FSDP's reduce-scatter then spreads it);
- step 4: its loss is NaN while its gradients stay finite (only the agreement makes rank 0 skip);
- step 7: its loss spikes x50: both ranks restore their own shards of the step-5 snapshot.
SCENARIO "save": 4 steps, a checkpoint at step 2 and 4, a NaN gradient at step 3 (one skip).
SCENARIO "resume": resumes "save" from its step-2 checkpoint, with the same fault at its first step (3).
SCENARIO "engine": no Trainer; ``fully_shard`` on a small MLP checks stabguard.engine directly, with a
NaN put into rank 1's local gradient shard only (MODEL_DIR and TRAIN_JSONL are not read).
Each rank writes OUT_DIR/rank<r>_<scenario>.json: per step the guards' norm and the norm of the gathered
(unsharded) gradients, verdicts, learning rates and a digest of this rank's local shards.
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

from stabguard import engine, hookimpl
from stabguard.runner import run

SPIKE = {"window": 5, "min_history": 3, "z": 8.0}
FSDP = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                              "state_dict_type": "SHARDED_STATE_DICT"}}


def lift_cpu_gate() -> None:
    """accelerate (state.py) sets DistributedType.FSDP only for accelerator device types; on a CPU
    (MULTI_CPU) it drops the FSDP plugin. Put it back, exactly as its accelerator branch would."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def digest(model, optimizer) -> str:
    """A hash of this rank's local shards of every trainable parameter and its optimizer state, bit for bit."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            for t in [p, *[v for _, v in sorted(optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]]:
                h.update(engine.local(t).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ShardProbe(StepProbe):
    """StepProbe plus, per step, the norm of the gathered gradients and a digest of the local shards."""

    def __init__(self):
        super().__init__()
        self.digests, self.full_norms, self.sharded = {}, {}, {}

    @hookimpl(trylast=True)
    def pre_step(self, state):
        super().pre_step(state)
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        self.sharded[state.step] = all(engine.is_sharded(g) for g in grads) and bool(grads)
        full = [g.full_tensor() if engine.is_sharded(g) else g for g in grads]
        self.full_norms[state.step] = torch.linalg.vector_norm(torch.cat([g.flatten() for g in full])).item()

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        super().on_step_end(state)
        self.digests[state.step] = digest(state.model, state.optimizer)


def OutputGradFault(at, **kwargs) -> GradFault:  # noqa: N802 - reads as the fault it makes
    """A GradFault at the first LoRA B output: FSDP2 replaces the parameters when it shards the model, so a
    hook on the parameter itself would never fire; this one corrupts the backward pass on its way to the
    (unsharded) LoRA weights' gradients, before FSDP reduce-scatters them."""
    return GradFault(at, where="output", **kwargs)


def scenario(name: str, out: Path):
    """(fault plugins, training overrides, resume)."""
    if name == "faults":
        return ([OutputGradFault(at={2}, value=float("nan"), rank=1), LossFault(at={4}, value=float("nan"), rank=1),
                 LossFault(at={7}, scale=50.0, rank=1)], {"max_steps": 8}, None)
    save = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2}
    if name == "save":
        return [OutputGradFault(at={3}, value=float("nan"), rank=1)], save, None
    return [OutputGradFault(at={1}, value=float("nan"), rank=1)], save, str(out / "run" / "checkpoint-2")


def engine_checks() -> dict:
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


def close_process_group() -> None:
    """Both ranks have written their report; end without the interpreter's teardown, where gloo's threads
    sometimes abort a finished rank ("terminate called without an active exception", seen under tox)."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(model_dir: str, train: str, out_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    if name == "engine":
        torch.distributed.init_process_group("gloo")
        report = engine_checks()
        Path(out_dir, f"rank{os.environ['RANK']}_engine.json").write_text(json.dumps(report, indent=1))
        close_process_group()
    lift_cpu_gate()
    rank, out = int(os.environ["RANK"]), Path(out_dir)
    faults, training, resume = scenario(name, out)
    probe = ShardProbe()
    plugins = guard_plugins(*faults, probe)
    recipe = tiny_recipe({"model": Path(model_dir), "train": Path(train)}, out / "run",
                         training={**FSDP, **training}, guards={"spike": SPIKE})
    result = run(write_recipe(out / f"recipe{rank}.toml", recipe), plugins=plugins, resume=resume)
    trainer = result.trainer
    adapter = {n: float(t.double().sum()) for n, t in engine.gathered_trainable(trainer.model).items()}
    events = [e for e in trainer.events.events if e["kind"] in ("skip", "rollback", "stop", "info")]
    report = {"rank": rank, "world_size": torch.distributed.get_world_size(), "ok": result.ok,
              "fsdp": trainer.is_fsdp_enabled, "global_step": result.global_step,
              "skipped_steps": result.skipped_steps, "verdicts": probe.verdicts, "digests": probe.digests,
              "norms": probe.norms, "full_norms": probe.full_norms, "sharded": probe.sharded, "lrs": probe.lrs,
              "adapter_sums": adapter,
              "events": [(e["kind"], e["guard"], e["step"], e["message"]) for e in events]}
    (out / f"rank{rank}_{name}.json").write_text(json.dumps(report, indent=1))
    close_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
