"""What the guarded step needs to know about the training engine: plain tensors or FSDP2's DTensors.

Single device and DDP keep every gradient as a whole tensor on every rank: one fused
``get_total_norm`` pass gives the global norm. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps
each parameter and gradient as a DTensor whose local shard is this rank's slice; the norm of the
local shards is partial, so the shards' norms are reduced in one collective per device mesh (one in
practice) and every rank gets the same value. Clipping and snapshots then act on the local shards
in place: no gather, no communication. DeepSpeed ZeRO keeps its gradients in its own partitions and
steps inside ``backward``: :mod:`stabguard.zero` has its engine.

:class:`TorchEngine` is what the guarded step calls for the first three; ``stabguard.zero.ZeroEngine``
implements the same :class:`Engine` protocol for DeepSpeed.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from stabguard import seams

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_sharded(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (a view: in-place ops reach it), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params``, the same on every rank (no host sync; NaN/Inf propagate)."""
    return grad_norms(params)[0]


def grad_norms(params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The global norm, and each gradient's norm, from one pass: the kernels torch's ``get_total_norm``
    runs (``_foreach_norm`` per device and dtype, then the norm of the stacked norms), its per-tensor
    results kept. No host sync; NaN/Inf propagate.

    Plain gradients: the per-tensor norms are whole (under DDP, of the all-reduced gradients). DTensor
    gradients: one pass per device mesh gives partial norms, whose total ``full_tensor()`` reduces across
    the mesh (one all-reduce); the per-tensor ones stay partial (``global_tensor_norms`` reduces them).
    """
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(()), []
    groups: dict = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.device_mesh if is_sharded(g) else None, []).append(i)
    per_tensor: list[torch.Tensor | None] = [None] * len(grads)
    totals = []
    for indices in groups.values():
        norms = _tensor_norms([grads[i] for i in indices])
        for i, n in zip(indices, norms):
            per_tensor[i] = n
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
        totals.append(total.full_tensor() if is_sharded(total) else total)
    if len(totals) == 1:
        return totals[0], per_tensor
    return torch.linalg.vector_norm(torch.stack([n.to(totals[0].device) for n in totals]), 2.0), per_tensor


def _tensor_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm, in order, with one ``_foreach_norm`` per device and dtype."""
    by_kind: dict = {}
    for i, g in enumerate(grads):
        by_kind.setdefault((g.device, g.dtype), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for indices in by_kind.values():
        for i, n in zip(indices, torch._foreach_norm([grads[i] for i in indices], 2.0)):
            out[i] = n
    return out


def global_tensor_norms(norms: list[torch.Tensor]) -> torch.Tensor:
    """The per-tensor norms of :func:`grad_norms` as one host-ready tensor of global values: a sharded
    one's partial norms are reduced across its mesh (one collective per mesh: every rank calls this)."""
    if not norms:
        return torch.zeros(0)
    meshes: dict = {}
    for i, n in enumerate(norms):
        meshes.setdefault(n.device_mesh if is_sharded(n) else None, []).append(i)
    out = torch.empty(len(norms), dtype=torch.float32)
    for mesh, indices in meshes.items():
        stacked = torch.stack([norms[i] for i in indices])
        values = stacked.full_tensor() if mesh is not None else stacked
        out[indices] = values.float().cpu()
    return out


def clip_with_norm(params: list[torch.Tensor], max_norm: float | torch.Tensor, norm: torch.Tensor) -> None:
    """Scale the gradients to at most ``max_norm`` using the step's global ``norm`` (no second pass).

    torch's ``clip_grads_with_norm_`` calls ``float(max_norm)``, a host sync for a device tensor; clipping
    to 1 with ``norm / max_norm`` gives the same coefficient (up to torch's 1e-6 guard) on the device.
    Sharded gradients get that coefficient on their local shards, in place.
    """
    if torch.is_tensor(max_norm):
        max_norm, norm = 1.0, norm / max_norm.to(norm.device)
    if not any(is_sharded(p.grad) for p in params):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [local(p.grad) for p in params if p.grad is not None]
    for same in _by_device(grads).values():
        torch._foreach_mul_(same, coef.to(same[0].device, same[0].dtype))


def _by_device(tensors: list[torch.Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


class Kept:
    """A copy of one tensor's local part (to the CPU with ``offload``), put back in place by ``into``.

    A DTensor keeps its layout, so a state the optimizer dropped since can be rebuilt as a DTensor.
    """

    __slots__ = ("data", "device", "layout")

    def __init__(self, value: torch.Tensor, offload: bool):
        part = local(value).detach()
        self.data = part.to("cpu" if offload else part.device, copy=True)
        self.device = part.device
        self.layout = (value.device_mesh, value.placements, value.shape, value.stride()) if is_sharded(value) else None

    @torch.no_grad()
    def into(self, live: torch.Tensor | None) -> torch.Tensor:
        """Copy into ``live`` when it still fits (its storage stays: paged, quantized, sharded); else a new tensor."""
        if torch.is_tensor(live) and is_sharded(live) == (self.layout is not None):
            part = local(live)
            if part.shape == self.data.shape and part.dtype == self.data.dtype:
                part.copy_(self.data)
                return live
        fresh = self.data.to(self.device, copy=True)
        if self.layout is None:
            return fresh
        mesh, placements, shape, stride = self.layout
        return DTensor.from_local(fresh, mesh, placements, run_check=False, shape=shape, stride=stride)


def gathered_trainable(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on the CPU, by name. A sharded one is gathered: a collective, so
    every rank calls this, in the same order (named_parameters' order is the same on every rank)."""
    return {name: (p.full_tensor() if is_sharded(p) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


class GradientArrival:
    """Which trainable parameters a gradient reached, from a hook on each (no sync; hooks are removed at
    the first read). Under DeepSpeed ZeRO ``p.grad`` is always None and a tensor that got no gradient has
    a zero partition; FSDP2 replaces the parameters it shards, so their hooks never fire and they are left
    out (a missing one has no ``p.grad`` there)."""

    def __init__(self, model):
        self.names: dict[int, str] = {}
        self.reached: set[str] = set()
        self.handles = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[id(p)] = name
                self.handles.append(p.register_post_accumulate_grad_hook(lambda _, name=name: self.reached.add(name)))

    def unreached(self, model) -> list[str]:
        """The hooked parameters still in ``model`` that no gradient reached (named as when hooked)."""
        self.remove()
        return [self.names[id(p)] for p in model.parameters()
                if id(p) in self.names and self.names[id(p)] not in self.reached]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SnapshotLike(Protocol):
    """A verified state: the step after which it was taken, the guards' state of that moment, a restore."""

    step: int
    guard_state: dict

    def restore(self, optimizer) -> None:
        """Put the weights and optimizer state back, in place, on this rank."""


class Engine(Protocol):
    """What the guarded step does with the gradients, wherever the training engine keeps them."""

    def grad_norm(self, model) -> torch.Tensor:
        """The global pre-clip L2 norm, the same on every rank, as a device tensor (no host sync)."""

    def clip(self, model, max_norm: float | torch.Tensor, norm: torch.Tensor) -> None:
        """Scale the gradients to at most ``max_norm``, using the step's measured ``norm``."""

    def proceed(self, optimizer) -> None:
        """This step's update runs."""

    def drop(self, model, optimizer) -> None:
        """No update: the optimizer and the LR scheduler hold this step."""

    def snapshot(self, step: int, model, optimizer, offload: bool, guard_state: Any) -> SnapshotLike:
        """The trainable state as it is now, after ``step``."""

    def tensor_norms(self, model) -> tuple[list[str], torch.Tensor]:
        """This step's gradient norm per parameter, global, on the CPU: for an anomalous step only (under
        sharding it takes collectives, which every rank runs together after the agreement)."""

    def replayable(self, model) -> bool:
        """Whether a forward of this rank alone can run (not when the weights are sharded)."""

    def missing_gradients(self, model) -> list[str]:
        """Trainable parameters that got no gradient this step (free to ask: no sync), or [] when the
        engine keeps gradients elsewhere."""


class TorchEngine:
    """The guarded step's actions on gradients in ``p.grad``: single device, DDP and FSDP2."""

    def __init__(self):
        self._names: list[str] = []
        self._norms: list[torch.Tensor] = []  # this step's per-tensor norms, on the device

    def grad_norm(self, model) -> torch.Tensor:
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        total, self._norms = grad_norms([p for _, p in named])
        self._names = [n for n, _ in named]
        return total

    def tensor_norms(self, model) -> tuple[list[str], torch.Tensor]:
        return self._names, global_tensor_norms(self._norms)

    def replayable(self, model) -> bool:
        return not any(is_sharded(p) for p in model.parameters())

    def missing_gradients(self, model) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    def clip(self, model, max_norm, norm) -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        if params:
            clip_with_norm(params, max_norm, norm)

    def proceed(self, optimizer) -> None:
        seams.mark_step_skipped(optimizer, False)

    def drop(self, model, optimizer) -> None:
        """No gradients, and the coming ``optimizer.step()`` is a no-op that holds the LR scheduler."""
        for p in model.parameters():
            p.grad = None
        seams.mark_step_skipped(optimizer, True)

    def snapshot(self, step: int, model, optimizer, offload: bool, guard_state) -> Snapshot:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return Snapshot(step, trainable, optimizer, offload, guard_state)


class Snapshot:
    """Copies of the trainable parameters and their optimizer state as they were after ``step``, and the
    guards' state of that moment (written into the checkpoint if the run stops). Under FSDP2 each rank
    keeps and restores its own shards: every rank restores at the same agreed verdict."""

    def __init__(self, step: int, params: list[torch.Tensor], optimizer, offload: bool, guard_state=None):
        self.step, self.guard_state = step, guard_state or {}
        self.params = [(p, Kept(p, offload)) for p in params]
        self.optim = {p: {k: keep(v, offload) for k, v in optimizer.state[p].items()}
                      for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        for p, saved in self.params:
            saved.into(p)
            if p in self.optim:
                optimizer.state[p] = put_back(optimizer.state.get(p, {}), self.optim[p])
            else:  # no state yet at snapshot time: the optimizer starts it afresh, as it did then
                optimizer.state.pop(p, None)


def keep(value, offload: bool):
    return Kept(value, offload) if torch.is_tensor(value) else copy.deepcopy(value)


def put_back(live: dict, saved: dict) -> dict:
    """Saved optimizer state, copied into the live tensors where they still fit (paged or quantized
    state keeps its storage), as fresh copies where not."""
    return {key: value.into(live.get(key)) if isinstance(value, Kept) else copy.deepcopy(value)
            for key, value in saved.items()}
