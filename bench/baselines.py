"""What users would run instead of stabguard, each written to behave as the peer's own code does.

Read from the peers' repositories (docs/benchmarks.md gives the table; /work/shared/reference/anchors.md
in the project's notes):

- ``source_note_arguments``: the plain ``transformers.Trainer`` with the settings of the engineering note
  stabguard grew from: ``max_grad_norm=0.3`` and ``logging_nan_inf_filter=True`` (which only changes
  the *logged* loss; the update is applied).
- ``swift_nan_norm``: ms-swift, ``swift/trainers/mixin.py`` (``_fix_grad_norm_nan``) patches
  ``Accelerator.clip_grad_norm_``: the norm is computed and the gradients clipped as usual, then, when
  the norm ``isnan()``, every gradient is set to None, so the optimizer leaves the weights alone. Inf
  is not NaN: an Inf norm passes (and clipping by it turns the Inf element into NaN). Clipping off:
  the patch never runs.
- ``SkipStepAdamW``: OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py`` (``get_step_factor``)
  and ``src/olmo_core/optim/adamw.py`` (``adamw_step``): a 0/1 factor from a ``sigma_factor``-sigma
  z-score of the loss and of the pre-clip grad norm over a rolling window (inactive until
  ``max(20, window // 2)`` losses are seen) multiplies the weight decay, the moment updates and the
  update. A NaN gradient times 0 is still NaN.
"""

from __future__ import annotations

import math

import torch


def source_note_arguments() -> dict:
    """The note's guard-related TrainingArguments (its lr/fp16/batch settings are the benchmark's own)."""
    return {"max_grad_norm": 0.3, "logging_nan_inf_filter": True}


def swift_nan_norm(accelerator) -> None:
    """ms-swift's ``_fix_grad_norm_nan``, applied to one Accelerator instance instead of the class."""
    original = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters, *args, **kwargs):
        # If NaN occurs, ignore weight updates.  (ms-swift's own comment)
        parameters = list(parameters)
        grad_norm = original(parameters, *args, **kwargs)
        if isinstance(grad_norm, torch.Tensor) and grad_norm.isnan().item():
            for p in parameters:
                p.grad = None
        return grad_norm

    accelerator.clip_grad_norm_ = clip_grad_norm_


class SkipStepAdamW(torch.optim.Optimizer):
    """OLMo-core's skip-step AdamW: set ``latest_loss`` (and ``latest_grad_norm``) before ``step()``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 rolling_interval_length: int = 128, sigma_factor: int = 6):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.rolling_interval_length, self.sigma_factor = rolling_interval_length, sigma_factor
        self._losses: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []
        self.pending_losses: list[torch.Tensor] = []  # this step's micro-batch losses (FeedSkipStep)

    def _keep(self, values: list, value: torch.Tensor) -> None:
        values.append(value.detach().float())
        del values[:-(self.rolling_interval_length + 1)]

    @property
    def latest_loss(self) -> torch.Tensor:
        return self._losses[-1]

    @latest_loss.setter
    def latest_loss(self, loss: torch.Tensor) -> None:
        self._keep(self._losses, loss)

    @property
    def latest_grad_norm(self) -> torch.Tensor | None:
        return self._grad_norms[-1] if self._grad_norms else None

    @latest_grad_norm.setter
    def latest_grad_norm(self, grad_norm: torch.Tensor) -> None:
        self._keep(self._grad_norms, grad_norm)

    def get_step_factor(self) -> torch.Tensor:
        """1.0 to proceed, 0.0 to skip; as OLMo-core computes it (a NaN z-score compares False: 0)."""
        if len(self._losses) < max(20, self.rolling_interval_length // 2):
            return torch.tensor(1.0)
        loss_std, loss_mean = torch.std_mean(torch.stack(self._losses[:-1]))
        ok = (self.latest_loss - loss_mean).abs().div(loss_std) <= self.sigma_factor
        if self._grad_norms:
            norm_std, norm_mean = torch.std_mean(torch.stack(self._grad_norms[:-1]))
            ok = ok & ((self.latest_grad_norm - norm_mean).abs().div(norm_std) <= self.sigma_factor)
        return ok.float()

    @torch.no_grad()
    def step(self, closure=None):
        if self.pending_losses:
            self.latest_loss, self.pending_losses = torch.stack(self.pending_losses).sum(), []
        factor = self.get_step_factor()
        self.step_skipped = 1 - factor
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += float(factor)  # OLMo-core: step.add_(step_factor)
                adamw_step(p, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"], exp_avg=state["exp_avg"],
                           exp_avg_sq=state["exp_avg_sq"], step=max(state["step"], 1.0), step_factor=factor)


def adamw_step(p, *, lr, betas, eps, weight_decay, exp_avg, exp_avg_sq, step, step_factor) -> None:
    """Equivalent to OLMo-core's ``adamw_step`` (its ``p.grad is None`` check and ``type_as`` casts left out;
    the step count kept outside)."""
    beta1, beta2 = betas
    p.mul_(1 - step_factor * (lr * weight_decay))
    exp_avg.lerp_(p.grad, step_factor * (1 - beta1))
    exp_avg_sq.mul_(1 - step_factor * (1 - beta2))
    exp_avg_sq.add_(step_factor * p.grad * p.grad, alpha=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    update = -step_size * torch.div(exp_avg, denom)
    update.mul_(step_factor)
    p.add_(update)


class FeedSkipStep:
    """What OLMo-core's Trainer and GradClipperCallback do for the optimizer, on the HF Trainer: the
    step's loss (sum of its micro-batch losses, from a forward hook) and the pre-clip grad norm (from
    ``Accelerator.clip_grad_norm_``; with clipping off there is none, as in OLMo-core) go in before
    ``step()``."""

    def __init__(self, optimizer: SkipStepAdamW):
        self.optimizer = optimizer

    def attach(self, model, accelerator) -> None:
        model.register_forward_hook(self._loss)
        clip = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, *args, **kwargs):
            norm = clip(parameters, *args, **kwargs)
            self.optimizer.latest_grad_norm = norm
            return norm

        accelerator.clip_grad_norm_ = clip_grad_norm_

    def _loss(self, module, args, output):
        if module.training and getattr(output, "loss", None) is not None:
            self.optimizer.pending_losses.append(output.loss.detach())
