"""Fault injection: make a run fail on purpose, to see the guards act (and to test your own guards).

Not a guard and not loaded by default: name it in a recipe, ``plugins = ["stabguard.faults"]``, and say
what to break in ``[guards.faults]``; ``stabguard.testing.run_guard(faults={...})`` takes the same keys.
Every fault happens where a real one would, before any guard looks:

- ``nan_grad_at`` / ``inf_grad_at``: a NaN or an Inf in one LoRA gradient during the backward pass of
  the chosen optimizer steps; ``grad_scale_at``: that gradient multiplied by ``grad_scale`` (finite, huge);
- ``loss_spike_at``: the loss of the chosen steps multiplied by ``loss_scale`` (the gradients follow);
- ``inf_loss_at`` / ``nan_loss_at``: the loss of the chosen steps becomes Inf or NaN while the gradients
  stay finite (what a rank whose loss alone overflowed reports: only a check of the loss sees it);
- ``spike_samples``: a sample that spikes every time it is seen, in training or in a replay: its logits
  pushed by ``logit_push`` towards a token it never predicts, so its own loss rises by about that much
  (its id, ``path:line``, or the end of it after a ``/``: ``train.jsonl:7``); once it is quarantined
  (its rows removed) it is never seen again;
- ``poison_batch_samples``: a sample that damages its whole micro-batch: whenever it is in one, every row
  of it gets that push (what packing without per-sample attention, MoE capacity dropping or a padding
  blow-up do); alone, only the sample itself is hit;
- ``damage_at``: a finite damaging update (noise added to every trainable weight right after the chosen
  steps' update: nothing is non-finite, only the next losses show it);
- ``nan_pixels_at``: a corrupt image (every pixel value NaN) in the chosen collated micro-batches;
- ``masked_batch_at``: a fully masked micro-batch (every label -100: the loss is 0/0).

``ranks`` limits every fault to those process ranks (``RANK`` under torchrun; empty: every rank), so a
fault can hit one rank of a multi-rank run. Steps are optimizer steps, 1-based. Micro-batches are counted in collation order, 1-based: with
``gradient_accumulation_steps = 1`` micro-batch N is trained in step N. ``recipes/pcb_tiny_faults.toml``
uses it.
"""

from __future__ import annotations

import os

import torch
from pydantic import Field

from stabguard import IGNORE_INDEX, GuardOptions, hookimpl
from stabguard.testing.probes import corrupted, lora_b

NAME = "faults"


class Options(GuardOptions):
    nan_grad_at: list[int] = Field(default_factory=list, description="optimizer steps whose gradient gets a NaN")
    inf_grad_at: list[int] = Field(default_factory=list, description="optimizer steps whose gradient gets an Inf")
    grad_scale_at: list[int] = Field(default_factory=list, description="optimizer steps whose gradient is scaled")
    grad_scale: float = Field(default=1e4, gt=0, description="the factor for grad_scale_at")
    loss_spike_at: list[int] = Field(default_factory=list, description="optimizer steps whose loss is scaled")
    loss_scale: float = Field(default=50.0, gt=0, description="the factor for loss_spike_at")
    inf_loss_at: list[int] = Field(default_factory=list, description="optimizer steps whose loss is Inf "
                                   "(gradients finite)")
    nan_loss_at: list[int] = Field(default_factory=list, description="optimizer steps whose loss is NaN "
                                   "(gradients finite)")
    spike_samples: list[str] = Field(default_factory=list, description="samples whose own loss is raised "
                                     "whenever they are seen")
    poison_batch_samples: list[str] = Field(default_factory=list, description="samples that raise the loss of "
                                            "every row of their micro-batch")
    logit_push: float = Field(default=50.0, gt=0, description="how far spike_samples and poison_batch_samples "
                              "push the logits (about the loss they add)")
    spike_from: int = Field(default=1, ge=1, description="the first optimizer step at which spike_samples and "
                            "poison_batch_samples act (a sample that goes bad mid-run)")
    damage_at: list[int] = Field(default_factory=list, description="optimizer steps whose update is followed "
                                 "by noise on every trainable weight")
    damage_std: float = Field(default=0.5, gt=0, description="the noise's standard deviation for damage_at")
    nan_pixels_at: list[int] = Field(default_factory=list, description="micro-batches whose images become NaN")
    masked_batch_at: list[int] = Field(default_factory=list, description="micro-batches whose labels are all -100")
    ranks: list[int] = Field(default_factory=list, description="the process ranks the faults act on (empty: "
                             "every rank)")


class FaultInjector:
    def __init__(self, options: Options):
        self.options = options
        self.step = 1  # the optimizer step the next forward/backward pass belongs to
        self.collated = 0  # micro-batches collated so far
        self.spiking: set[int] = set()  # fingerprints of spike_samples' rows (their tokens), as collated
        self.poisoning: set[int] = set()  # and of poison_batch_samples' rows
        self._param: torch.nn.Parameter | None = None  # the LoRA B weight whose gradient gets the faults

    @hookimpl
    def setup_model(self, model, events):
        name, param = lora_b(model)
        param.register_hook(self._corrupt)
        self._param = param
        model.get_submodule(name.rsplit(".", 1)[0]).register_forward_hook(self._through_output)
        if self.options.loss_spike_at or self.options.inf_loss_at or self.options.nan_loss_at:
            model.register_forward_hook(self._spike)
        if self.options.spike_samples or self.options.poison_batch_samples:
            model.register_forward_hook(self._push_rows, with_kwargs=True)
        armed = {k: v for k, v in self.options.model_dump().items() if k.endswith("_at") and v}
        if not self._here():
            armed = {}
        ranks = f" on rank(s) {self.options.ranks}" if self.options.ranks else ""
        events.record(NAME, "info", f"fault injection armed on {name}{ranks}: {armed or 'nothing'}", armed=armed)

    def _here(self) -> bool:
        return not self.options.ranks or int(os.environ.get("RANK", "0")) in self.options.ranks

    def _through_output(self, module, args, output):
        """FSDP2 replaces the parameters with sharded ones, and a hook on the old one never fires: then the
        gradient is corrupted where it enters the LoRA B module's output (its weight's gradient follows)."""
        if module.training and output.requires_grad and all(p is not self._param for p in module.parameters()):
            output.register_hook(self._corrupt)

    def _corrupt(self, grad: torch.Tensor) -> torch.Tensor:
        opts = self.options
        if not self._here():
            return grad
        scale = opts.grad_scale if self.step in opts.grad_scale_at else None
        value = float("nan") if self.step in opts.nan_grad_at else float("inf") if self.step in opts.inf_grad_at else None
        return grad if scale is None and value is None else corrupted(grad, value=value, scale=scale)

    def _spike(self, module, args, output):
        opts, loss = self.options, getattr(output, "loss", None)
        if not (module.training and torch.is_grad_enabled() and loss is not None and self._here()):
            return None  # a replay runs without gradients: it does not see these faults (transients)
        if self.step in opts.loss_spike_at:
            output.loss = loss * opts.loss_scale
        value = float("inf") if self.step in opts.inf_loss_at else float("nan") if self.step in opts.nan_loss_at else None
        if value is not None:
            output.loss = output.loss + (value - output.loss.detach())  # the value only: gradients unchanged
        return output

    def _push_rows(self, module, args, kwargs, output):
        """Rows are told by their tokens, so a replay, alone or in another batch, is hit as training was."""
        ids, logits = kwargs.get("input_ids"), getattr(output, "logits", None)
        if ids is None or logits is None or self.step < self.options.spike_from or not self._here():
            return None
        prints = [_fingerprint(row, mask) for row, mask in zip(ids, _mask(kwargs, ids))]
        rows = [r for r, f in enumerate(prints) if f in self.spiking]
        if any(f in self.poisoning for f in prints):
            rows = list(range(len(prints)))
        if not rows:
            return None
        push = torch.zeros_like(logits)
        push[rows, :, -1] = self.options.logit_push  # the last token of the vocabulary: never a target here
        output.logits = logits + push
        labels = kwargs.get("labels")
        if labels is not None and getattr(output, "loss", None) is not None:
            output.loss = _causal_loss(output.logits, labels, kwargs.get("num_items_in_batch"))
        return output

    def _named(self, sample_id: str, names: list[str]) -> bool:
        return any(sample_id == s or sample_id.endswith("/" + s) for s in names)

    @hookimpl(tryfirst=True)  # before any guard audits the batch
    def post_collate(self, batch, samples, events):
        self.collated += 1
        if not self._here():
            return
        for row, sample in enumerate(samples):
            for names, found in ((self.options.spike_samples, self.spiking),
                                 (self.options.poison_batch_samples, self.poisoning)):
                if self._named(str(sample.get("id")), names):
                    found.add(_fingerprint(batch["input_ids"][row], _mask(batch, batch["input_ids"])[row]))
        if self.collated in self.options.nan_pixels_at and "pixel_values" in batch:
            batch["pixel_values"].fill_(float("nan"))
            events.record(NAME, "info", f"fault: NaN pixels in micro-batch {self.collated}",
                          fault="nan_pixels", samples=[s.get("id") for s in samples])
        if self.collated in self.options.masked_batch_at:
            batch["labels"].fill_(IGNORE_INDEX)
            events.record(NAME, "info", f"fault: every label masked in micro-batch {self.collated}",
                          fault="masked_batch", samples=[s.get("id") for s in samples])

    @hookimpl
    def on_step_end(self, state, events):
        self.step = state.step + 1
        if state.step in self.options.damage_at and self._here():
            self._damage(state.model, state.step, events)

    @torch.no_grad()
    def _damage(self, model, step: int, events) -> None:
        generator = torch.Generator().manual_seed(step)
        for param in (p for p in model.parameters() if p.requires_grad):
            noise = torch.randn(param.shape, generator=generator) * self.options.damage_std
            param.add_(noise.to(param.device, param.dtype))
        events.record(NAME, "info", f"fault: noise (std {self.options.damage_std:g}) added to every trainable "
                      f"weight after step {step}'s update", step=step, fault="damage")


def _mask(inputs, ids: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return mask if mask is not None else torch.ones_like(ids)


def _fingerprint(ids: torch.Tensor, mask: torch.Tensor) -> int:
    return hash(tuple(ids[mask.bool()].tolist()))


def _causal_loss(logits: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """The causal LM loss as the model computes it (mean over supervised tokens, or their sum / num_items)."""
    flat, targets = logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device)
    if num_items is None:
        return torch.nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
    total = torch.nn.functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / num_items


@hookimpl
def register_guards(register):
    register(NAME, Options, FaultInjector)
