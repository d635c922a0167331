"""``stabguard check --probe``: one real forward and backward of the recipe's first batches, before the
GPU hours go.

``stabguard check`` never runs the model; the failures users report most often only show once it has run.
The probe *is* the run's first optimizer step: it builds the trainer exactly as ``stabguard run`` does
(quantization, LoRA, the guards' set-up hooks, the data collator, the recipe's engine: one device, DDP,
FSDP2 or DeepSpeed ZeRO, on every rank under ``torchrun``), runs one step of the first K micro-batches of
the training data through the guarded step, and vetoes its update (a SKIP; nothing is saved). A plugin
of that run (:class:`StepRecorder`) sees:

1. each trainable tensor's global gradient norm (the step's one norm pass has them): the tensors that got
   no gradient, a zero one or a non-finite one (a gradient path cut inside the model, unsloth#5039,
   ms-swift PR#10214), and frozen tensors that got one;
2. max |output| per module in that forward, against fp16's range (65504) and the run's dtype: the first
   module past it, or the headroom (QwenLM/Qwen3#868);
3. the loss the Trainer accumulated over the K micro-batches (each passed ``num_items_in_batch``) against
   the token-weighted cross-entropy of the very logits it came from: a forward that drops
   ``num_items_in_batch`` is off by about K (transformers#37766);
4. the pixel values against the range the processor's normalisation gives: images rescaled twice sit in
   a sliver of it (ms-swift#2280);
5. the stack (torch, CUDA, GPU, attention, engine, precision) against ``known_bad.toml``;
6. the step's time and, on a GPU, its peak memory.

The ranks' records are gathered (one collective) so every rank reports the same. Guards add their own
findings through the ``probe`` hook, which fires on every rank once the gradients are complete
(``vision_freeze``: no gradient reached the frozen tower).
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
from stabguard.engine import GradientArrival
from stabguard.findings import guard_findings
from stabguard.hookspecs import hookimpl
from stabguard.verdict import Verdict
from stabguard.where import float_tensors, module_of, modules_of

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
ACCUMULATION_TOLERANCE = 0.02  # relative: the two losses are the same numbers summed in another order
PIXEL_SLIVER = 0.02  # pixel values spanning less than this share of the normalised range: rescaled twice


# -- what one forward and backward shows --------------------------------------------------------------

@dataclass
class Gradients:
    """Trainable tensors by what their gradient was after the probe's backward (LoRA A matrices whose B is
    still all zero, as initialised, get a zero gradient by design: not listed); frozen ones that got one."""

    missing: list[str]
    zero: list[str]
    nonfinite: list[str]
    trainable: int
    frozen_with_grad: list[str]


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


def environment_facts() -> dict[str, Any]:
    """The versions and the GPU of this process, as the known-bad table names them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": installed("transformers"),
        "accelerate": installed("accelerate"), "peft": installed("peft"), "deepspeed": installed("deepspeed"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def precision_of(training: dict) -> str:
    return "fp16" if training.get("fp16") else "bf16" if training.get("bf16") else "fp32"


def stack_facts(recipe, model) -> dict[str, Any]:
    """What the known-bad table is matched on, for this process and this recipe."""
    from stabguard.engine_check import engine_spec

    training = recipe.training
    config = getattr(model, "config", None)
    return {
        **environment_facts(),
        "attn_implementation": getattr(config, "_attn_implementation", None) or recipe.model.attn_implementation,
        "engine": engine_spec(training).kind, "precision": precision_of(training),
        "quantization": "4bit" if recipe.quantization.load_in_4bit else "none",
        "max_length": recipe.data.max_length, "model": recipe.model.name_or_path,
    }


def trainer_facts(trainer) -> dict[str, Any]:
    """The known-bad table's facts for a trainer a framework built (no recipe: its arguments and model)."""
    from stabguard.engine_check import engine_of

    args, model = trainer.args, trainer.model
    config = getattr(model, "config", None)
    training = {"fp16": args.fp16, "bf16": args.bf16, "deepspeed": args.deepspeed,
                "fsdp": bool(args.fsdp), "fsdp_config": {"version": (args.fsdp_config or {}).get("version", 2)}}
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(config, "quantization_config", None)
    return {**environment_facts(), "attn_implementation": getattr(config, "_attn_implementation", None),
            "engine": engine_of(training), "precision": precision_of(training),
            "quantization": "4bit" if quantized else "none", "max_length": None,
            "model": getattr(config, "_name_or_path", None)}


def stack_findings(facts: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """``(level, message, details)`` for each known-bad entry the facts match."""
    found = []
    for entry in known_bad():
        if matches(entry["when"], facts):
            details = [f"fix: {entry['fix']}", "threads: " + ", ".join(entry["threads"])]
            found.append((entry.get("level", "warn"), entry["what"], details))
    return found


# -- the probe: the run's own first step, with no update ----------------------------------------------

PROBE_PLUGIN = "core:probe"


class StepRecorder:
    """A plugin of the probe's one-step run: it records what the step's forward and backward showed, and
    vetoes the update (SKIP). It sees the step wherever the engine keeps it: one device, DDP, FSDP2 or
    DeepSpeed, on every rank; each rank's records are gathered, so every rank holds the same ``seen``.

    Gradients are read from the norms the step's one norm pass already has per tensor (global ones under
    FSDP2 and ZeRO), through ``state.where``; whether a gradient arrived at all, from a hook on each
    trainable parameter (DeepSpeed keeps a zero partition for one that got none; FSDP2 replaces the
    parameters, and a missing one has no norm). The loss the Trainer accumulates is compared with the
    token-weighted cross-entropy of the very logits it came from."""

    def __init__(self, plugins, recipe):
        self.plugins, self.recipe = plugins, recipe
        self.processor = None
        self.recorder: ActivationRange | None = None
        self.handle = None
        self.zero_b: set[str] = set()  # LoRA B matrices still all zero: their A's gradient is 0 by design
        self.arrival: GradientArrival | None = None
        self.pixels: list[tuple[float, float]] = []
        self.batches: list[dict] = []
        self.loss_sum, self.tokens, self.samples = 0.0, 0, 0
        self.started: float | None = None
        self.mine: dict[str, Any] = {}
        self.seen: dict[str, Any] | None = None  # every rank's records, merged

    @hookimpl(trylast=True)  # after every other set-up: the hooks see outputs as the run's forward makes them
    def setup_model(self, model, processor):
        self.processor = processor
        self.zero_b = {_bare(n) for n, p in model.named_parameters()
                       if ".lora_B." in n and p.requires_grad and not bool(p.detach().any())}
        self.arrival = GradientArrival(model)
        self.recorder = ActivationRange(model)
        self.handle = model.register_forward_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs, output) -> None:
        if self.started is None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.started = time.perf_counter()
        labels = kwargs.get("labels")
        logits = output.get("logits") if isinstance(output, dict) else None
        if labels is not None and logits is not None:
            total, count = token_loss_sum(logits.detach(), labels)
            self.loss_sum, self.tokens = self.loss_sum + total, self.tokens + count
            self.samples = max(self.samples, int(labels.shape[0]))
        self.batches.append(dict(kwargs))

    @hookimpl
    def post_collate(self, batch):
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.numel():
            self.pixels.append((float(pixels.min()), float(pixels.max())))

    @hookimpl
    def pre_step(self, state, events):
        """The gradients are complete: the guards' ``probe`` hooks read them here, before the veto drops them."""
        if self.seen is not None or self.started is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.started
        self.handle.remove()
        model = getattr(state.model, "module", state.model)  # DeepSpeed's engine, DDP: the model inside
        found = _Found()
        guard_findings(self.plugins, "probe", found, events, recipe=self.recipe, model=model, batches=self.batches)
        self.mine = {
            "frozen_with_grad": [n for n, p in state.model.named_parameters() if not p.requires_grad and
                                 p.grad is not None],
            "trainable": [n for n, p in state.model.named_parameters() if p.requires_grad],
            "unreached": [_bare(n) for n in self.arrival.unreached(state.model)],
            "peaks": self.recorder.remove(), "pixels": self.pixels, "micro_batches": len(self.batches),
            "samples": self.samples, "loss": float(state.loss), "loss_sum": self.loss_sum, "tokens": self.tokens,
            "seconds": seconds, "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "guards": found.findings,
        }
        state.ask_where()
        return Verdict.skip("probe: forward and backward only, no update")

    @hookimpl
    def on_step_end(self, state):
        if self.seen is not None or not self.mine:
            return
        tensors = state.where.tensors if state.where else {}
        everyone = _gather(self.mine)
        self.seen = merge(everyone, tensors, self.zero_b)


class _Found:
    """What ``guard_findings`` adds to, kept as plain findings to gather across ranks."""

    def __init__(self):
        self.findings: list[dict] = []

    def add(self, check, level, message, details=None, *, guard="", values=None):
        self.findings.append({"check": check, "level": level, "message": message, "details": list(details or []),
                              "guard": guard, "values": dict(values or {})})


def _pixel_span(pixels: list[tuple[float, float]]) -> tuple[float, float]:
    """The lowest and highest pixel values over every batch; NaN wins (``min`` would keep it or not by order)."""
    lows, highs = [p[0] for p in pixels], [p[1] for p in pixels]
    if any(math.isnan(v) for v in lows + highs):
        return math.nan, math.nan
    return min(lows), max(highs)


def _bare(name: str) -> str:
    return re.sub(r"^(module\.|_orig_mod\.)+", "", name)


def _gather(mine: dict) -> list[dict]:
    """Every rank's records, in rank order (one collective; just this rank's outside torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def merge(everyone: list[dict], tensors: dict[str, float], zero_b: set[str]) -> dict[str, Any]:
    """The ranks' records as one: gradients from the global per-tensor norms (the same on every rank), the
    largest activation and pixel range of any rank, the loss the Trainer logs (the ranks' mean) against the
    token-weighted mean over every rank's tokens. Findings of a guard's ``probe`` once, by rank where they
    differ."""
    trainable = everyone[0]["trainable"]  # the same names on every rank, as the global norms are
    unreached = set.intersection(*(set(r["unreached"]) for r in everyone))  # on no rank
    missing = [n for n in trainable if n not in tensors or _bare(n) in unreached]
    nonfinite = [n for n in trainable if n in tensors and not math.isfinite(tensors[n])]
    zero = [n for n in trainable
            if tensors.get(n) == 0.0 and _bare(n) not in unreached and not _a_of_zero_b(n, zero_b)]
    frozen = sorted({n for r in everyone for n in r["frozen_with_grad"]})
    peaks: dict[str, float] = {}
    for r in everyone:
        for module, value in r["peaks"]:
            peaks[module] = max(peaks.get(module, value), value) if math.isfinite(value) else value
    pixels = [p for r in everyone for p in r["pixels"]]
    guards: list[dict] = []
    for r in everyone:
        for f in r["guards"]:
            key = {k: f[k] for k in ("check", "level", "message")}
            if not any({k: g[k] for k in key} == key for g in guards):
                on = [i for i, o in enumerate(everyone) if any({k: g[k] for k in key} == key for g in o["guards"])]
                guards.append({**f, "message": f["message"] if len(on) == len(everyone) else
                               f"rank {', '.join(map(str, on))}: {f['message']}"})
    bytes_ = [r["peak_bytes"] for r in everyone if r["peak_bytes"] is not None]
    return {
        "gradients": Gradients(missing, zero, nonfinite, len(trainable), frozen),
        "peaks": list(peaks.items()),
        "pixels": _pixel_span(pixels) if pixels else None,
        "loss": sum(r["loss"] for r in everyone) / len(everyone),
        "reference": sum(r["loss_sum"] for r in everyone) / max(sum(r["tokens"] for r in everyone), 1),
        "tokens": sum(r["tokens"] for r in everyone),
        "micro_batches": everyone[0]["micro_batches"], "samples": everyone[0]["samples"], "ranks": len(everyone),
        "seconds": max(r["seconds"] for r in everyone), "peak_bytes": max(bytes_) if bytes_ else None,
        "guards": guards,
    }


def _a_of_zero_b(name: str, zero_b: set[str]) -> bool:
    return ".lora_A." in name and _bare(name).replace(".lora_A.", ".lora_B.") in zero_b


def probe_arguments(recipe, batches: int, output_dir: str | None) -> dict:
    """The run's training arguments for one optimizer step of ``batches`` micro-batches, saving nothing."""
    from stabguard.engine_check import deepspeed_config
    from stabguard.runner import run_arguments

    arguments = {**run_arguments(recipe), "max_steps": 1, "gradient_accumulation_steps": batches,
                 "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "logging_steps": 1}
    if output_dir is not None:
        arguments["output_dir"] = output_dir  # nothing of the probe lands in the run's folder
    if arguments.get("deepspeed"):  # its batch sizes follow the probe's accumulation
        config = dict(deepspeed_config(arguments["deepspeed"]))
        if config:
            config.pop("train_batch_size", None)  # DeepSpeed works it out from the two below
            arguments["deepspeed"] = {**config, "gradient_accumulation_steps": "auto"}
    return arguments


def probe(recipe, plugins, report, events, *, batches: int = 2, output_dir: str | None = None) -> None:
    """Build the recipe's trainer as ``stabguard run`` does and run one optimizer step of ``batches`` real
    micro-batches with its update vetoed; add what it showed to ``report`` (findings under "probe: ...").
    Under torchrun every rank runs it with the recipe's engine; every rank gets the same findings."""
    import transformers

    from stabguard.runner import build_trainer, quiet_log_dicts

    args = transformers.TrainingArguments(**probe_arguments(recipe, batches, output_dir))
    recorder = StepRecorder(plugins, recipe)
    plugins.register(recorder, PROBE_PLUGIN, source="core")
    try:
        trainer = build_trainer(recipe, plugins, events, args)
        quiet_log_dicts(trainer)
        trainer.train()
    finally:
        plugins.unregister(PROBE_PLUGIN)
    seen = recorder.seen
    if seen is None:
        stopped = getattr(trainer, "stop_verdict", None)
        why = f"the step stopped first: {stopped.reason}" if stopped else f"{recipe.data.train} gave no batch"
        report.add("probe", "error", f"the probe's step did not run: {why}")
        return
    report_seen(seen, stack_facts(recipe, trainer.model), trainer, recorder.processor, report)


def report_seen(seen: dict, facts: dict[str, Any], trainer, processor, report) -> None:
    """What the probe's step showed (``StepRecorder.seen``), as findings: shared by ``stabguard check
    --probe`` and a framework's run in probe mode (``stabguard.integrations``)."""
    report_gradients(seen["gradients"], report)
    report_activations(seen["peaks"], facts["precision"], report)
    check_accumulation(seen, loss_is_scaled(trainer), report)
    check_pixels(processor, seen["pixels"], report)
    for level, message, details in stack_findings(facts):
        report.add("probe: stack", level, message, details)
    if not any(f.check == "probe: stack" for f in report.findings):
        report.add("probe: stack", "ok", f"no known-bad combination ({len(known_bad())} known)")
    report_step(seen, report)
    for f in seen["guards"]:
        report.add(f["check"], f["level"], f["message"], f["details"], guard=f["guard"], values=f["values"])


def report_step(seen: dict, report) -> None:
    peak = seen["peak_bytes"]
    memory = f"; peak memory {peak / 2**30:.2f} GiB" if peak is not None else " (no GPU: peak memory not measured)"
    estimate = (report.memory or {}).get("total_gib")
    versus = f" (check's estimate {estimate:.2f} GiB)" if peak is not None and estimate else ""
    ranks = f" on each of {seen['ranks']} ranks" if seen["ranks"] > 1 else ""
    report.add("probe: step", "info", f"forward + backward of {seen['micro_batches']} batch(es) of {seen['samples']} "
               f"sample(s){ranks}: {seen['seconds']:.2f} s{memory}{versus}",
               values={"seconds": seen["seconds"], "peak_bytes": peak, "ranks": seen["ranks"]})


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
                             "them (the loss can still fall); they will never train. Fix: find what detaches the "
                             "hidden states after them (a forward hook, a custom forward, torch.no_grad, a "
                             "checkpointed block whose inputs need no grad: model.enable_input_require_grads())"),
        ("nonfinite", "error", "trainable tensors got NaN/Inf gradients"),
        ("zero", "warn", "trainable tensors got an all-zero gradient: not reached by this data, or cut off inside "
                         "the model"),
        ("frozen_with_grad", "error", "frozen tensors hold a gradient"),
    ]
    for field_name, level, what in kinds:
        names = getattr(g, field_name)
        if names:
            report.add(check, level, f"{len(names)} {what}", modules_of(names)[:20], values={field_name: names})
    if not (g.missing or g.nonfinite or g.zero or g.frozen_with_grad):
        report.add(check, "ok", f"all {g.trainable} trainable tensors got a finite gradient; no frozen one got any")


def report_activations(peaks: list[tuple[str, float]], precision: str, report) -> None:
    check = "probe: activations"
    if not peaks:
        return
    bad = next(((m, v) for m, v in peaks if not math.isfinite(v)), None)
    if bad:
        report.add(check, "error", f"the first non-finite output is {bad[0]}'s: every module that ran before it "
                   "gave finite outputs (its own inputs may not be: see probe: pixels)", values={"module": bad[0]})
        return
    over = next(((m, v) for m, v in peaks if v > FP16_MAX), None)
    top, largest = max(peaks, key=lambda x: x[1])
    if over:
        module, value = over
        level = "error" if precision == "fp16" else "warn"
        runs = ("this run is fp16: it will overflow. Fix: bf16 (training.bf16 = true, Ampere or newer), or fp32"
                if precision == "fp16" else f"this run is {precision}, which holds it")
        report.add(check, level, f"fp16 would overflow at {module} (max {value:.3g}, limit {FP16_MAX:.0f}); {runs}",
                   [f"largest: {top} ({largest:.3g})"], values={"module": module, "max": value})
        return
    report.add(check, "ok", f"largest output {largest:.3g} at {top}: {FP16_MAX / max(largest, 1e-30):.3g}x below "
               f"fp16's limit ({FP16_MAX:.0f})", values={"module": top, "max": largest,
                                                          "fp16_headroom": FP16_MAX / max(largest, 1e-30)})


def check_accumulation(seen: dict, scaled: bool, report) -> None:
    """The loss the Trainer accumulated over the step's micro-batches (as it logs it: the ranks' mean)
    against the token-weighted cross-entropy of the same forwards' logits over every rank's tokens."""
    check = "probe: accumulation"
    k = seen["micro_batches"]
    if k < 2:
        report.add(check, "info", "one batch probed: the accumulation check needs --batches 2 or more")
        return
    if not seen.get("tokens"):
        report.add(check, "info", "not checked: the model's forward got no labels (the trainer computes the loss "
                   "outside the model, as TRL's SFTTrainer does), so there is no model loss to compare")
        return
    accumulated, reference = seen["loss"], seen["reference"]
    factor = accumulated / reference if reference else math.nan
    values = {"accumulated": accumulated, "reference": reference, "factor": factor, "batches": k}
    if math.isfinite(factor) and abs(factor - 1) <= ACCUMULATION_TOLERANCE:
        how = [] if scaled else [
            "the model does not take num_items_in_batch (accepts_loss_kwargs = False): the Trainer divides each "
            "batch's mean by the accumulation, so a token in a batch with fewer supervised tokens weighs more"]
        report.add(check, "ok", f"the loss over {k} accumulated batches is the token-weighted mean within "
                   f"{ACCUMULATION_TOLERANCE:.0%} ({accumulated:.4f} vs {reference:.4f})", how, values=values)
        return
    expected = [k, k * seen["ranks"]]  # the Trainer also multiplies by the ranks when averaging tokens over them
    cause = (f"about {k}x, the number of batches{' (times the ranks)' if seen['ranks'] > 1 else ''}: the model's "
             "forward ignores num_items_in_batch and returns a per-batch mean, which the Trainer does not divide "
             "(transformers#37766)"
             if math.isfinite(factor) and any(abs(factor - e) / e <= 0.25 for e in expected) else
             "the model's loss is not the token-weighted cross-entropy of its logits (a custom loss, label "
             "smoothing, or a loss over other positions)")
    fix = ("Fix: pass num_items_in_batch on to the loss in the forward, or set the model's accepts_loss_kwargs = "
           "False so the Trainer divides by the accumulation")
    report.add(check, "error", f"the accumulated loss is {factor:.3g}x the token-weighted mean ({accumulated:.4f} vs "
               f"{reference:.4f}): {cause}; every threshold on the loss and grad norm is off by as much. {fix}",
               values=values)


def check_pixels(processor, seen: tuple[float, float] | None, report) -> None:
    check = "probe: pixels"
    image_processor = getattr(processor, "image_processor", None)
    if seen is None:
        report.add(check, "info", "no image in the probed batches")
        return
    low, high = seen
    if not (math.isfinite(low) and math.isfinite(high)):
        report.add(check, "error", f"pixel values are non-finite (min {low}, max {high}): a corrupt image or a "
                   "broken preprocessing step; every output after the vision tower's first layer follows",
                   values={"min": low, "max": high})
        return
    if image_processor is None:
        report.add(check, "info", f"pixel values span {low:.4g} to {high:.4g}; not compared with the expected range "
                   "(the guards were given no image processor)", values={"min": low, "max": high})
        return
    lo, hi = expected_pixel_range(image_processor)
    values = {"min": low, "max": high, "expected": [lo, hi]}
    span = f"pixel values span {low:.4g} to {high:.4g}; normalising [0, 1] pixels gives {lo:.3g} to {hi:.3g}"
    if high - low < PIXEL_SLIVER * (hi - lo):
        report.add(check, "error", f"{span}: images rescaled twice? Pixels divided by 255 once too often sit in a "
                   "sliver of the range (ms-swift#2280: loss 1.8 -> 663, then NaN). Check the image processor's "
                   "rescale_factor and do_rescale, and whether the data holds already-scaled images", values=values)
    elif low < lo - 0.05 * (hi - lo) or high > hi + 0.05 * (hi - lo):
        report.add(check, "warn", f"{span}: not normalised as this processor would (rescaled too little, or "
                   "normalised twice?)", values=values)
    else:
        report.add(check, "ok", span, values=values)
