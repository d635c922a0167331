"""Test plugins: faults made in one place (a gradient, a loss, a batch) and a probe of what each step did.

Each fault happens where it would in a real run, before any guard looks: a corrupted LoRA gradient
(tensor hook), a corrupted loss (forward hook), a poisoned batch (``post_collate``). ``rank`` limits a
fault to one rank of a ``torchrun`` run. For faults by recipe keys, see :mod:`stabguard.faults`.
"""

from __future__ import annotations

import os

import torch

from stabguard import Verdict, hookimpl


def on_rank(rank: int | None) -> bool:
    return rank is None or int(os.environ.get("RANK", "0")) == rank


def lora_b(model) -> tuple[str, torch.nn.Parameter]:
    """The first trainable LoRA B weight (lora_A's gradient is zero until lora_B has moved from zero)."""
    return next((n, p) for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad)


def corrupted(grad: torch.Tensor, *, value: float | None = None, scale: float | None = None) -> torch.Tensor:
    """``grad`` times ``scale``, and/or with its first element set to ``value`` (NaN, Inf); a new tensor."""
    grad = grad.clone() if scale is None else grad * scale
    if value is not None:
        grad.view(-1)[0] = value
    return grad


class GradFault:
    """Corrupts one LoRA gradient in the chosen backward passes (1-based): ``value`` replaces one
    element (NaN, Inf), ``scale`` multiplies the whole gradient (1e6).

    ``where="param"``: the gradient of the first parameter whose name holds ``param`` (lora_B by default:
    lora_A's gradient is zero until lora_B has moved away from its zero init). ``where="output"``: the
    gradient flowing back through the first LoRA B module's output, before the engine reduces anything;
    for FSDP2 and DeepSpeed, which replace or partition the parameters (a hook on them never fires).
    """

    def __init__(self, at, *, value=None, scale=None, rank=None, param="lora_B", where="param"):
        self.at, self.value, self.scale, self.rank, self.param = set(at), value, scale, rank, param
        self.where, self.backwards = where, 0

    @hookimpl
    def setup_model(self, model):
        if self.where == "output":
            module = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
            module.register_forward_hook(self._on_output)
        else:
            next(p for n, p in model.named_parameters() if self.param in n).register_hook(self.corrupt)

    def _on_output(self, module, args, out):
        if module.training and out.requires_grad:
            out.register_hook(self.corrupt)

    def corrupt(self, grad):
        self.backwards += 1
        if self.backwards not in self.at or not on_rank(self.rank):
            return grad
        return corrupted(grad, value=self.value, scale=self.scale)


class LossFault:
    """Corrupts the model's loss in the chosen training forwards (1-based; a replay of a rejected step runs
    without gradients and is not one, so it does not reproduce this fault: a transient). ``scale`` multiplies it, and
    the gradients follow (Inf, or a finite spike); ``value`` replaces only its value and leaves the
    gradients finite (a loss that is NaN on one rank only)."""

    def __init__(self, at, *, scale=None, value=None, rank=None):
        self.at, self.scale, self.value, self.rank = set(at), scale, value, rank
        self.forwards = 0

    @hookimpl
    def setup_model(self, model):
        model.register_forward_hook(self.corrupt)

    def corrupt(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):  # a replay (no_grad) is not a training forward
            return None
        self.forwards += 1
        if self.forwards not in self.at or not on_rank(self.rank):
            return None
        loss = output.loss
        output.loss = loss * self.scale if self.scale is not None else loss + (self.value - loss.detach())
        return output


class PoisonBatch:
    """Fills the pixels of the chosen collated micro-batches (1-based) with NaN; keeps every batch's ids."""

    def __init__(self, at):
        self.at = set(at)
        self.ids: list[list[str]] = []

    @hookimpl
    def post_collate(self, batch, samples):
        self.ids.append([s["id"] for s in samples])
        if len(self.ids) in self.at:
            batch["pixel_values"].fill_(float("nan"))


class StopAt:
    """A guard that stops the run at step ``k``."""

    def __init__(self, k):
        self.k = k

    @hookimpl
    def pre_step(self, state):
        if state.step == self.k:
            return Verdict.stop("test says stop", "stop-at")


def trainable_state(state) -> tuple[dict, dict]:
    """Copies of the trainable parameters and their optimizer state, keyed by parameter name."""
    named = [(n, p) for n, p in state.model.named_parameters() if p.requires_grad]
    opt = state.optimizer.state
    params = {n: p.detach().clone() for n, p in named}
    optim = {n: {k: v.clone() for k, v in opt[p].items() if torch.is_tensor(v)} for n, p in named if p in opt}
    return params, optim


def same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """Bit-identical parameters and optimizer state."""
    (pa, oa), (pb, ob) = a, b
    return (pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
            and oa.keys() == ob.keys()
            and all(oa[n].keys() == ob[n].keys() and all(torch.equal(oa[n][k], ob[n][k]) for k in oa[n]) for n in oa))


class StepProbe:
    """Per step: the verdict, learning rate, loss and grad norm; for the steps in ``keep``, the trainable
    state before the step (pre_step, last) and at its end (on_step_end, last: after any rollback)."""

    def __init__(self, keep=()):
        self.keep = set(keep)
        self.verdicts, self.reasons, self.lrs, self.losses, self.norms = {}, {}, {}, {}, {}
        self.before, self.after = {}, {}

    @hookimpl(trylast=True)
    def pre_step(self, state):
        self.lrs[state.step] = state.optimizer.param_groups[0]["lr"]
        self.losses[state.step] = state.host()["loss"]
        self.norms[state.step] = state.host()["grad_norm"]
        if state.step in self.keep:
            self.before[state.step] = trainable_state(state)

    @hookimpl(trylast=True)
    def on_step_end(self, state):
        self.verdicts[state.step] = state.verdict.action.name
        self.reasons[state.step] = str(state.verdict)
        if state.step in self.keep:
            self.after[state.step] = trainable_state(state)

    def steps(self, action: str) -> list[int]:
        return sorted(s for s, v in self.verdicts.items() if v == action)
