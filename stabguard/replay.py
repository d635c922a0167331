"""Replay a rejected step: its micro-batches again, forward only, with a loss per sample.

A rejected step is rare, so it can afford evidence (Megatron-LM's rerun state machine is the anchor). The
guarded step (:mod:`stabguard.step`) keeps each micro-batch's inputs, its sample ids, the RNG state its
forward started from and the loss the model returned (:class:`Micro`); none of it is read on a healthy step.
On a rejected step:

- :func:`check_determinism` runs the micro-batches again on the weights the step ran on, from the same RNG
  state: a loss that differs from the step's own is the hardware (a silent data corruption), not the data;
- :func:`gather` runs them on the weights in place (the restored verified state after a rollback) and
  gives each sample's loss in its batch, then each *high* sample's loss alone, in a batch of its own: a
  sample that poisons its neighbours (packing, padding, a batch-level effect) is high in its batch and
  alone, its neighbours only in the batch.

:func:`classify` reads the evidence of every rank with a stated rule. The reference is the loss the last
verified weights were accepted with (on the step before: the same weights, other data); a sample is
**high** when its loss is non-finite or above ``factor`` times it.

- some samples high alone, not all (or the step's only sample): *concentrated* in those samples;
- several samples, every one high alone, or high only together: *spread* (the weights, not the data);
- none high, but the verified weights' own loss is ``factor`` times the best kept state's: *diverged*
  (the last verified state is itself far from where the run was);
- none high: *transient* (gone on replay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stabguard import IGNORE_INDEX

IMAGE_KEYS = ("pixel_values", "image_grid_thw")


@dataclass
class Micro:
    """One micro-batch of the step, as the forward saw it (kept until the step decides)."""

    inputs: dict
    samples: list[str]  # the id of each row, in order
    images: list[int]  # images of each row, in order (their patches follow each other in pixel_values)
    rng: tuple | None = None  # (cpu state, cuda state or None) when its forward started
    loss: torch.Tensor | None = None  # the model's own loss for it (0-dim, on the device)
    step_loss: torch.Tensor | None = None  # its loss as the Trainer scaled it for accumulation
    extra: dict = field(default_factory=dict)  # what the forward got besides inputs (num_items_in_batch)


@dataclass
class Evidence:
    """What a replay found, on one rank or merged over all ranks."""

    batch: dict[str, float] = field(default_factory=dict)  # sample -> its loss in its micro-batch
    alone: dict[str, float] = field(default_factory=dict)  # high sample -> its loss alone
    mismatches: list[dict] = field(default_factory=list)  # {"rank", "micro", "step", "replay"}
    reference: float | None = None  # the loss the weights replayed on were accepted with
    best: float | None = None  # the lowest loss a kept verified state was accepted with
    factor: float = 3.0

    def high(self, loss: float) -> bool:
        return not math.isfinite(loss) or (self.reference is not None and loss > self.factor * self.reference)

    def merge(self, others: list[Evidence]) -> Evidence:
        merged = Evidence(reference=_mean([o.reference for o in others]), best=_mean([o.best for o in others]),
                          factor=self.factor)
        for other in others:
            merged.batch.update(other.batch)
            merged.alone.update(other.alone)
            merged.mismatches += other.mismatches
        return merged


@dataclass
class Diagnosis:
    """The class of a rejected step and what it rests on."""

    kind: str  # "transient", "concentrated", "spread", "diverged", "unknown"
    samples: list[str]  # concentrated: the culprits
    said: str  # the rule and the numbers, for a person

    def values(self) -> dict:
        return {"diagnosis": self.kind, "samples": self.samples, "said": self.said}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def classify(evidence: Evidence | None) -> Diagnosis:
    """The rule of this module's docstring, on the evidence of every rank."""
    if evidence is None or not evidence.batch or evidence.reference is None:
        return Diagnosis("unknown", [], "no replay (the engine shards the weights, or nothing was kept)")
    ref, factor, n = evidence.reference, evidence.factor, len(evidence.batch)
    line = f"replayed {n} sample(s); reference loss {ref:.4g}, high above {factor:g}x = {factor * ref:.4g}"
    high_batch = [s for s, loss in evidence.batch.items() if evidence.high(loss)]
    high_alone = [s for s in high_batch if evidence.high(evidence.alone.get(s, 0.0))]
    numbers = ", ".join(f"{s} {evidence.batch[s]:.4g} in batch / {_alone(evidence, s)} alone" for s in high_batch[:6])
    if high_alone and (len(high_alone) < n or n == 1):
        return Diagnosis("concentrated", high_alone, f"{line}: {len(high_alone)} of {n} high on their own ({numbers})")
    if high_batch:
        return Diagnosis("spread", [], f"{line}: {len(high_batch)} of {n} high, {len(high_alone)} on their own "
                         f"({numbers})")
    if evidence.best is not None and ref > factor * evidence.best:
        return Diagnosis("diverged", [], f"{line}: none high against it, but it is {ref / evidence.best:.1f}x the "
                         f"best kept state's {evidence.best:.4g}")
    worst = max(evidence.batch.values())
    return Diagnosis("transient", [], f"{line}: none high (largest {worst:.4g}): gone on replay")


def _alone(evidence: Evidence, sample: str) -> str:
    value = evidence.alone.get(sample)
    return "-" if value is None else f"{value:.4g}"


# -- running the micro-batches again ----------------------------------------------------------------


def capture_rng() -> tuple:
    """The RNG state a forward starts from (a copy of a few KB; no device sync)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _forward(model, inputs: dict, rng: tuple | None, extra: dict):
    """``model(**inputs)`` without gradients, from the saved RNG state (dropout draws the same masks)."""
    devices = [torch.cuda.current_device()] if rng is not None and rng[1] is not None else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        if rng is not None:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1])
        return model(**inputs, **extra)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each row's mean cross-entropy over its supervised tokens (one row at a time: a row's logits only)."""
    out = []
    for row in range(labels.shape[0]):
        targets = labels[row, 1:].to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets, ignore_index=IGNORE_INDEX,
                                               reduction="sum")
        out.append(ce / (targets != IGNORE_INDEX).sum().clamp(min=1))
    return torch.stack(out).tolist() if out else []


def check_determinism(model, micro: list[Micro], rank: int, extra: Callable[[Micro], dict],
                      tolerance: float) -> list[dict]:
    """Micro-batches whose replay on the same weights, inputs and RNG state gives another loss than the step."""
    found = []
    for index, m in enumerate(micro):
        if m.loss is None or not m.samples:
            continue
        replayed = _forward(model, m.inputs, m.rng, extra(m)).loss
        step, again = torch.stack([m.loss.float(), replayed.float().to(m.loss.device)]).tolist()
        same = (math.isnan(step) and math.isnan(again)) or math.isclose(step, again, rel_tol=tolerance, abs_tol=1e-6)
        if not same:
            found.append({"rank": rank, "micro": index + 1, "step": step, "replay": again})
    return found


def gather(model, micro: list[Micro], evidence: Evidence) -> Evidence:
    """Each sample's loss in its micro-batch on the weights in place, then each high one's loss alone."""
    for m in micro:
        if not m.samples or not torch.is_tensor(m.inputs.get("labels")):
            continue
        inputs = {k: v for k, v in m.inputs.items() if k != "labels"}
        logits = _forward(model, inputs, m.rng, {}).logits
        losses = row_losses(logits, m.inputs["labels"])
        evidence.batch.update(zip(m.samples, losses))
        for row, (sample, loss) in enumerate(zip(m.samples, losses)):
            if evidence.high(loss) and len(m.samples) > 1:
                evidence.alone[sample] = _alone_loss(model, m, row)
            elif evidence.high(loss):
                evidence.alone[sample] = loss
    return evidence


def _alone_loss(model, m: Micro, row: int) -> float:
    one = select_rows(m.inputs, [row], m.images)
    logits = _forward(model, {k: v for k, v in one.items() if k != "labels"}, m.rng, {}).logits
    return row_losses(logits, one["labels"])[0]


# -- rows in and out of a collated batch -----------------------------------------------------------


def select_rows(batch: dict, rows: list[int], images: list[int]) -> dict:
    """A collated batch with only ``rows`` (in their order): per-row tensors indexed, each kept row's images'
    patches kept (``images``: the images of each row). Other values stay as they are."""
    size = batch["input_ids"].shape[0] if torch.is_tensor(batch.get("input_ids")) else len(images)
    out = {}
    for key, value in batch.items():
        if key in IMAGE_KEYS:
            continue
        if key == "position_ids" and torch.is_tensor(value) and value.dim() == 3:  # (3, batch, tokens)
            out[key] = value[:, rows]
        elif torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == size:
            out[key] = value[rows]
        else:
            out[key] = value
    if torch.is_tensor(batch.get("image_grid_thw")) and torch.is_tensor(batch.get("pixel_values")):
        out.update(_images_of(batch, rows, images))
    return out


def _images_of(batch: dict, rows: list[int], images: list[int]) -> dict:
    grid, pixels = batch["image_grid_thw"], batch["pixel_values"]
    patches = grid.prod(dim=-1).tolist()
    starts = [sum(patches[:i]) for i in range(len(patches))]
    first = [sum(images[:r]) for r in range(len(images))]
    kept = [i for r in rows for i in range(first[r], first[r] + images[r])]
    index = [p for i in kept for p in range(starts[i], starts[i] + patches[i])]
    where = torch.tensor(index, dtype=torch.long, device=pixels.device)
    return {"pixel_values": pixels.index_select(0, where), "image_grid_thw": grid[kept]}
