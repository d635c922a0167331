"""``stabguard check --probe``: one real forward and backward of the recipe's first batches, before the
GPU hours go.

``stabguard check`` never runs the model; the failures users report most often only show once it has run.
The probe builds the trainer exactly as ``stabguard run`` would (quantization, LoRA, the guards' set-up
hooks, the data collator), takes the first K batches of the training data and, without an optimizer step:

1. backpropagates them and names the trainable tensors that got no gradient, a zero one or a non-finite
   one (a gradient path cut inside the model, unsloth#5039, ms-swift PR#10214);
2. records max |output| per module in that forward, against fp16's range (65504) and the run's dtype:
   the first module past it, or the headroom (QwenLM/Qwen3#868);
3. compares the loss the Trainer would accumulate over the K batches (each passed ``num_items_in_batch``)
   with the token-weighted mean worked out here from the logits: a forward that drops
   ``num_items_in_batch`` is off by about K (transformers#37766);
4. checks the pixel values against the range the processor's normalisation gives: images rescaled twice
   sit in a sliver of it (ms-swift#2280);
5. matches the stack (torch, CUDA, GPU, attention, engine, precision) against ``known_bad.toml``;
6. times the step, and on a GPU measures its peak memory.

Guards add their own findings through the ``probe`` hook (``vision_freeze``: no gradient reached the
frozen tower). One process: FSDP2 and DeepSpeed recipes and checks under ``torchrun`` are not probed yet
(``stabguard check`` says so); probe such a recipe with its engine off.
"""

from __future__ import annotations

import math
import re
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from stabguard import IGNORE_INDEX
from stabguard.where import float_tensors, module_of, modules_of

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
ACCUMULATION_TOLERANCE = 0.02  # relative: the two losses are the same numbers summed in another order
PIXEL_SLIVER = 0.02  # pixel values spanning less than this share of the normalised range: rescaled twice


# -- what one forward and backward shows --------------------------------------------------------------

@dataclass
class Gradients:
    """Trainable tensors by what their gradient was after the probe's backward; frozen ones that got one."""

    missing: list[str]
    zero: list[str]
    nonfinite: list[str]
    trainable: int
    frozen_with_grad: list[str]


def gradient_reach(model: torch.nn.Module) -> Gradients:
    """LoRA A matrices whose B is still all zero (as initialised) get a zero gradient by design: not listed."""
    params = dict(model.named_parameters())
    missing, zero, nonfinite, frozen, trainable = [], [], [], [], 0
    for name, p in params.items():
        if not p.requires_grad:
            if p.grad is not None:
                frozen.append(name)
            continue
        trainable += 1
        if p.grad is None:
            missing.append(name)
        elif not bool(torch.isfinite(p.grad).all()):
            nonfinite.append(name)
        elif not bool(p.grad.any()) and not _b_is_zero(params, name):
            zero.append(name)
    return Gradients(missing, zero, nonfinite, trainable, frozen)


def _b_is_zero(params: dict, name: str) -> bool:
    b = params.get(name.replace(".lora_A.", ".lora_B.")) if ".lora_A." in name else None
    return b is not None and not bool(b.detach().any())


_PEFT_INSIDE = re.compile(r"\.(base_layer|lora_dropout|lora_[AB]|lora_embedding_[AB])(\.|$)")  # the wrapper speaks


class ActivationRange:
    """Forward hooks recording each module's largest |output| (device tensors; one host copy at the end)."""

    def __init__(self, model: torch.nn.Module):
        self.peaks: dict[str, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if n and not _PEFT_INSIDE.search(n) and not isinstance(m, torch.nn.Dropout)]

    def _hook(self, name: str):
        label = module_of(name + ".weight")[0]

        def record(module, args, output):
            if isinstance(output, dict):
                return  # a whole model's output (a ModelOutput): its tensors are its modules' outputs
            for t in float_tensors(output):
                if t.numel():
                    self.peaks.setdefault(label, []).append(t.detach().abs().amax().float())
        return record

    def remove(self) -> list[tuple[str, float]]:
        """``[(module, max |output|)]`` in the order the modules first ran."""
        for h in self.handles:
            h.remove()
        if not self.peaks:
            return []
        values = torch.stack([torch.stack(v).amax() for v in self.peaks.values()]).cpu().tolist()
        return list(zip(self.peaks, values))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Cross-entropy summed over the supervised next-token positions, and how many there are."""
    shift_logits, shift_labels = logits[..., :-1, :].float(), labels[..., 1:]
    total = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                              shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((shift_labels != IGNORE_INDEX).sum())


def expected_pixel_range(image_processor) -> tuple[float, float]:
    """The range normalisation gives pixels rescaled once to [0, 1]: ``(0 - mean) / std`` to
    ``(1 - mean) / std`` over the channels; [0, 1] when the processor does not normalise."""
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if not getattr(image_processor, "do_normalize", False) or mean is None or std is None:
        return 0.0, 1.0
    return min((0.0 - m) / s for m, s in zip(mean, std)), max((1.0 - m) / s for m, s in zip(mean, std))


# -- known-bad stacks -----------------------------------------------------------------------------

def known_bad() -> list[dict]:
    """The entries of ``stabguard/known_bad.toml``."""
    return tomllib.loads(resources.files("stabguard").joinpath("known_bad.toml").read_text())["stack"]


def matches(when: dict[str, str], facts: dict[str, Any]) -> bool:
    """Every condition holds: a version range (``>=2.11``) for versions and numbers, else a regular
    expression (case-insensitive). A fact that is unknown (None) matches no condition."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    for key, condition in when.items():
        fact = facts.get(key)
        if fact is None:
            return False
        try:
            spec = SpecifierSet(condition)
        except InvalidSpecifier:
            if not re.search(condition, str(fact), flags=re.I):
                return False
            continue
        try:
            if Version(str(fact).split("+")[0]) not in spec:
                return False
        except InvalidVersion:
            return False
    return True


def stack_facts(recipe, model) -> dict[str, Any]:
    """What the known-bad table is matched on, for this process."""
    from importlib.metadata import PackageNotFoundError, version

    from stabguard.engine_check import engine_spec

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    training = recipe.training
    precision = "fp16" if training.get("fp16") else "bf16" if training.get("bf16") else "fp32"
    config = getattr(model, "config", None)
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": installed("transformers"),
        "accelerate": installed("accelerate"), "peft": installed("peft"), "deepspeed": installed("deepspeed"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "attn_implementation": getattr(config, "_attn_implementation", None) or recipe.model.attn_implementation,
        "engine": engine_spec(training).kind, "precision": precision,
        "quantization": "4bit" if recipe.quantization.load_in_4bit else "none",
        "max_length": recipe.data.max_length, "model": recipe.model.name_or_path,
    }


def stack_findings(facts: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """``(level, message, details)`` for each known-bad entry the facts match."""
    found = []
    for entry in known_bad():
        if matches(entry["when"], facts):
            details = [f"fix: {entry['fix']}", "threads: " + ", ".join(entry["threads"])]
            found.append((entry.get("level", "warn"), entry["what"], details))
    return found


# -- the probe -------------------------------------------------------------------------------------

def probe(recipe, plugins, report, events, *, batches: int = 2, output_dir: str | None = None) -> None:
    """Build the recipe's trainer, run ``batches`` real batches forward and backward (no optimizer step),
    and add what they show to ``report`` (findings under "probe: ..."), then the guards' ``probe`` hooks."""
    import transformers

    from stabguard.check import guard_findings
    from stabguard.runner import build_trainer, run_arguments

    arguments = run_arguments(recipe)
    if output_dir is not None:
        arguments["output_dir"] = output_dir  # nothing of the probe lands in the run's folder
    args = transformers.TrainingArguments(**{**arguments, "report_to": "none"})
    trainer = build_trainer(recipe, plugins, events, args)
    model = trainer.model.to(args.device)
    inputs = first_batches(trainer, batches)
    if not inputs:
        report.add("probe", "error", f"no batch to probe: {recipe.data.train} gave none")
        return
    check_pixels(trainer.processing_class, inputs, report)
    check_accumulation(trainer, model, inputs, report)
    gradients, peaks, seconds, peak_bytes = forward_backward(trainer, model, inputs)
    report_gradients(gradients, report)
    facts = stack_facts(recipe, model)
    report_activations(peaks, facts["precision"], report)
    for level, message, details in stack_findings(facts):
        report.add("probe: stack", level, message, details)
    if not any(f.check == "probe: stack" for f in report.findings):
        report.add("probe: stack", "ok", f"no known-bad combination ({len(known_bad())} known)")
    memory = f"; peak memory {peak_bytes / 2**30:.2f} GiB" if peak_bytes is not None else \
        " (no GPU: peak memory not measured)"
    estimate = (report.memory or {}).get("total_gib")
    versus = f" (check's estimate {estimate:.2f} GiB)" if peak_bytes is not None and estimate else ""
    report.add("probe: step", "info", f"forward + backward of {len(inputs)} batch(es) of {len(inputs[0]['input_ids'])} "
               f"sample(s): {seconds:.2f} s{memory}{versus}", values={"seconds": seconds, "peak_bytes": peak_bytes})
    guard_findings(plugins, "probe", report, events, recipe=recipe, model=model, batches=inputs)
    model.zero_grad(set_to_none=True)


def first_batches(trainer, k: int) -> list[dict]:
    """The first ``k`` batches of the training data, collated as the run collates them, on the device."""
    out = []
    for batch in trainer.get_train_dataloader():
        out.append(trainer._prepare_inputs(batch))
        if len(out) == k:
            break
    return out


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("stabguard_")}


def forward_backward(trainer, model, inputs: list[dict]):
    """The step as the Trainer runs it (train mode, ``num_items_in_batch`` over the K batches), hooks
    recording activations; gradients stay in ``p.grad`` for the guards' probe hooks."""
    model.train()
    model.zero_grad(set_to_none=True)
    items = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in inputs)
    recorder = ActivationRange(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        for batch in inputs:
            loss = trainer.compute_loss(model, model_inputs(batch), num_items_in_batch=items)
            if not loss_is_scaled(trainer):
                loss = loss / len(inputs)
            if loss.requires_grad:  # else no trainable tensor is reached at all: every one is reported
                loss.backward()
    finally:
        peaks = recorder.remove()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return gradient_reach(model), peaks, seconds, peak


def loss_is_scaled(trainer) -> bool:
    """Whether the Trainer takes the loss as already divided by the accumulation (as its training_step)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is not None:
        return bool(scaled)
    return bool(trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)


def report_gradients(g: Gradients, report) -> None:
    check = "probe: gradients"
    kinds = [
        ("missing", "error", f"of {g.trainable} trainable tensors got no gradient: the gradient path is cut before "
                             "them (the loss can still fall); they will never train"),
        ("nonfinite", "error", "trainable tensors got NaN/Inf gradients"),
        ("zero", "warn", "trainable tensors got an all-zero gradient: not reached by this data, or cut off inside "
                         "the model"),
        ("frozen_with_grad", "error", "frozen tensors hold a gradient"),
    ]
    for field_name, level, what in kinds:
        names = getattr(g, field_name)
        if names:
            report.add(check, level, f"{len(names)} {what}", modules_of(names)[:20], values={field_name: names})
    if not (g.missing or g.nonfinite or g.frozen_with_grad):
        report.add(check, "ok", f"all {g.trainable} trainable tensors got a finite gradient; no frozen one got any")


def report_activations(peaks: list[tuple[str, float]], precision: str, report) -> None:
    check = "probe: activations"
    if not peaks:
        return
    bad = next(((m, v) for m, v in peaks if not math.isfinite(v)), None)
    if bad:
        report.add(check, "error", f"the first non-finite output is {bad[0]}'s (with finite inputs)", values={
            "module": bad[0]})
        return
    over = next(((m, v) for m, v in peaks if v > FP16_MAX), None)
    top, largest = max(peaks, key=lambda x: x[1])
    if over:
        module, value = over
        level = "error" if precision == "fp16" else "warn"
        runs = "this run is fp16: it will overflow" if precision == "fp16" else f"this run is {precision}, which holds it"
        report.add(check, level, f"fp16 would overflow at {module} (max {value:.3g}, limit {FP16_MAX:.0f}); {runs}",
                   [f"largest: {top} ({largest:.3g})"], values={"module": module, "max": value})
        return
    report.add(check, "ok", f"largest output {largest:.3g} at {top}: {FP16_MAX / max(largest, 1e-30):.3g}x below "
               f"fp16's limit ({FP16_MAX:.0f})", values={"module": top, "max": largest,
                                                          "fp16_headroom": FP16_MAX / max(largest, 1e-30)})


def check_accumulation(trainer, model, inputs: list[dict], report) -> None:
    """The loss the Trainer accumulates over the K batches against the token-weighted mean from the logits."""
    check = "probe: accumulation"
    if len(inputs) < 2:
        report.add(check, "info", "one batch probed: the accumulation check needs --batches 2 or more")
        return
    items = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in inputs)
    accumulated, reference = 0.0, 0.0
    model.eval()  # the same forward twice without dropout
    try:
        with torch.no_grad():
            for batch in inputs:
                loss, outputs = trainer.compute_loss(model, model_inputs(batch), return_outputs=True,
                                                     num_items_in_batch=items)
                accumulated += float(loss) if loss_is_scaled(trainer) else float(loss) / len(inputs)
                total, _ = token_loss_sum(outputs["logits"], batch["labels"])
                reference += total / items
    finally:
        model.train()
    factor = accumulated / reference if reference else math.nan
    values = {"accumulated": accumulated, "reference": reference, "factor": factor, "batches": len(inputs)}
    if math.isfinite(factor) and abs(factor - 1) <= ACCUMULATION_TOLERANCE:
        how = [] if loss_is_scaled(trainer) else [
            "the model does not take num_items_in_batch (accepts_loss_kwargs = False): the Trainer divides each "
            "batch's mean by the accumulation, so a token in a batch with fewer supervised tokens weighs more"]
        report.add(check, "ok", f"the loss over {len(inputs)} accumulated batches is the token-weighted mean within "
                   f"{ACCUMULATION_TOLERANCE:.0%} ({accumulated:.4f} vs {reference:.4f})", how, values=values)
        return
    cause = (f"about {len(inputs)}x, the number of batches: the model's forward ignores num_items_in_batch and "
             "returns a per-batch mean, which the Trainer does not divide (transformers#37766)"
             if math.isfinite(factor) and abs(factor - len(inputs)) / len(inputs) <= 0.25 else
             "the model's loss is not the token-weighted cross-entropy of its logits (a custom loss, label "
             "smoothing, or a loss over other positions)")
    report.add(check, "error", f"the accumulated loss is {factor:.3g}x the token-weighted mean ({accumulated:.4f} vs "
               f"{reference:.4f}): {cause}; every threshold on the loss and grad norm is off by as much",
               values=values)


def check_pixels(processor, inputs: list[dict], report) -> None:
    check = "probe: pixels"
    pixels = [b["pixel_values"] for b in inputs if b.get("pixel_values") is not None]
    image_processor = getattr(processor, "image_processor", None)
    if not pixels or image_processor is None:
        report.add(check, "info", "no image in the probed batches")
        return
    low, high = (float(min(p.min() for p in pixels)), float(max(p.max() for p in pixels)))
    lo, hi = expected_pixel_range(image_processor)
    values = {"min": low, "max": high, "expected": [lo, hi]}
    seen = f"pixel values span {low:.4g} to {high:.4g}; normalising [0, 1] pixels gives {lo:.3g} to {hi:.3g}"
    if high - low < PIXEL_SLIVER * (hi - lo):
        report.add(check, "error", f"{seen}: images rescaled twice? Pixels divided by 255 once too often sit in a "
                   "sliver of the range (ms-swift#2280: loss 1.8 -> 663, then NaN). Check the image processor's "
                   "rescale_factor and do_rescale, and whether the data holds already-scaled images", values=values)
    elif low < lo - 0.05 * (hi - lo) or high > hi + 0.05 * (hi - lo):
        report.add(check, "warn", f"{seen}: not normalised as this processor would (rescaled too little, or "
                   "normalised twice?)", values=values)
    else:
        report.add(check, "ok", seen, values=values)
