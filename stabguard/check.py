"""``stabguard check``: every preflight of a recipe, without training and without loading weights.

The usual causes of an exploding Qwen3-VL LoRA run (incomplete model files, a wrong label mask, the wrong
model class, too high a learning rate, no clipping) cost GPU hours when found by a run. Here they cost seconds:
the recipe is validated, the model's files and the data are checked on disk, the model is built as a
skeleton on the ``meta`` device (exact parameter counts, no memory, any size) and wrapped with LoRA,
the guards' ``configure``/``setup_model`` hooks run on it as in a real run, then their ``preflight``
hooks report what each guard finds (the parameter table, the optimizer audit), a sample batch is collated
and audited by the guards' ``post_collate`` hooks (the mask guard), and the memory the run needs is
estimated from the configuration with the arithmetic shown. For a hub id that is not a local folder
nothing is downloaded: the known Qwen3-VL sizes in ``stabguard.memory`` stand in for its config.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch

from stabguard.events import EventLog
from stabguard.findings import (  # noqa: F401 - importable from here as before
    KIND_LEVEL, LEVELS, Finding, Report, call_each, guard_findings, report_events)
from stabguard.memory import estimate_memory, known_config, trainable_counts, weight_counts
from stabguard.progress import ProgressFn, labelled
from stabguard.recipe import RecipeError, training_args_view


# -- model files -----------------------------------------------------------------------------------

def _json(path: Path, problems: list[str]) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return {}


REQUIRED_FILES = (("config", ("config.json",)),
                  ("processor config", ("preprocessor_config.json", "processor_config.json")),
                  ("tokenizer config", ("tokenizer_config.json",)))


def model_file_problems(folder: str | Path) -> tuple[list[str], list[str]]:
    """(problems, what was found) for a local checkpoint folder: config, processor config, tokenizer,
    chat template, and every weight shard the index names."""
    folder, problems, found = Path(folder), [], []
    present = {p.name for p in folder.iterdir() if p.is_file()}
    for label, names in REQUIRED_FILES:
        if present.intersection(names):
            found.append(label)
        else:
            problems.append(f"{' or '.join(names)}: missing ({label})")
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= present:
        problems.append("tokenizer.json (or vocab.json + merges.txt): missing (tokenizer files)")
    configs = [_json(folder / n, problems) for n in ("tokenizer_config.json", "processor_config.json")]
    if present & {"chat_template.jinja", "chat_template.json"} or any(c.get("chat_template") for c in configs):
        found.append("chat template")
    else:
        problems.append("chat_template.jinja: missing (no chat template in chat_template.json, tokenizer_config.json "
                        "or processor_config.json either): conversations cannot be rendered")
    return problems + _shard_problems(folder, found), found


def _shard_problems(folder: Path, found: list[str]) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            problems: list[str] = []
            shards = sorted(set(_json(folder / index_name, problems).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file() or (folder / s).stat().st_size == 0]
            found.append(f"{len(shards) - len(missing)}/{len(shards)} weight shards")
            return problems + [f"{s}: missing or empty (named in {index_name})" for s in missing]
    if (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file():
        found.append("1 weight file")
        return []
    return ["model.safetensors (or model.safetensors.index.json and its shards): missing (no weights)"]


def check_model_files(recipe, report: Report) -> bool:
    """True when the model is a local folder whose files are complete."""
    name = recipe.model.name_or_path
    if not Path(name).is_dir():
        report.add("model files", "warn", f"{name} is not a local folder; its files cannot be checked offline "
                   "(stabguard check downloads nothing): point model.name_or_path at a local snapshot to check them")
        return False
    problems, found = model_file_problems(name)
    if problems:
        report.add("model files", "error", f"{name}: {len(problems)} missing or broken file(s)", problems)
        return False
    report.add("model files", "ok", f"{name}: {', '.join(found)}")
    return True


# -- data ------------------------------------------------------------------------------------------

def check_data(recipe, report: Report, rows: int, images: int, progress: ProgressFn | None = None) -> bool:
    from stabguard.data import check_images, check_rows

    ok = True
    for split, path in (("train", recipe.data.train), ("val", recipe.data.val)):
        if path is None:
            continue
        shown = labelled(progress, split)
        problems = check_rows(path, limit=rows, progress=shown) + check_images(path, sample=images, progress=shown)
        if problems:
            ok = False
            report.add("data", "error", f"{split} {path}: {len(problems)} problem(s)", problems[:20])
        else:
            report.add("data", "ok", f"{split} {path}: first {rows} rows valid, up to {images} images decoded")
    return ok


# -- the model skeleton ----------------------------------------------------------------------------

def model_config(recipe, local: bool):
    if local:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(recipe.model.name_or_path)
    return known_config(recipe.model.name_or_path)


def build_skeleton(recipe, config) -> tuple[Any, dict[str, int]]:
    """The recipe's model on the meta device, LoRA-wrapped; and its weight counts for the memory estimate."""
    from stabguard.models import lora_config, peft_quietly, resolve_model_class

    cls = resolve_model_class(recipe.model.model_class)
    with torch.device("meta"):
        net = cls.from_config(config) if cls.__name__.startswith("Auto") else cls._from_config(config)
        counts = weight_counts(net, recipe.quantization)
        if recipe.lora.enabled:
            from peft import get_peft_model

            with peft_quietly():
                net = get_peft_model(net, lora_config(recipe.lora))
    return net, counts


def check_optimizer(recipe, model, plugins, report: Report, events: EventLog):
    """Build the optimizer the run would (``make_optimizer``); the guards audit it in their preflight."""
    args = training_args_view(recipe)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.weight_decay}]
    start = len(events.events)
    optimizer = call_each(plugins, "make_optimizer", "optimizer", report, events, model=model, args=args,
                          param_groups=groups)
    report_events(events, start, "optimizer", report)
    if optimizer is None:
        report.add("optimizer", "ok", "the Trainer's torch AdamW over the trainable parameters only")
    return optimizer


def check_guards_preflight(recipe, model, processor, optimizer, plugins, report: Report, events: EventLog) -> None:
    """Each guard's own findings (the ``preflight`` hook); a finding with a ``table`` value under
    "parameters" is the parameter table of ``--json``."""
    guard_findings(plugins, "preflight", report, events, recipe=recipe, model=model, processor=processor,
                   optimizer=optimizer)
    tables = [f.values["table"] for f in report.findings if f.check == "parameters" and "table" in f.values]
    report.parameters = tables[0] if tables else None


# -- label masks of a sample batch -----------------------------------------------------------------

def supervised_spans(labels: torch.Tensor, ignore: int) -> list[list[int]]:
    """The contiguous supervised runs of one row (one per assistant turn when the mask is right)."""
    pairs = zip((labels != ignore).tolist(), labels.tolist())
    return [[i for _, i in run] for kept, run in itertools.groupby(pairs, key=lambda x: x[0]) if kept]


def check_masks(recipe, processor, plugins, report: Report, events: EventLog, size: int,
                progress: ProgressFn | None = None) -> None:
    """Collate the first ``size`` conversations as the run would; the guards' post_collate audits them."""
    from stabguard.collate import IGNORE_INDEX, ChatCollator
    from stabguard.data import ConversationDataset

    if not [i for i in plugins.hook.post_collate.get_hookimpls() if i.plugin_name.startswith("guard:")]:
        report.add("masks", "warn", "no enabled guard audits the labels (post_collate): they are shown, not audited")
    data, start = recipe.data, len(events.events)
    try:
        dataset = ConversationDataset(data.train, progress=labelled(progress, "train"))
        samples = [dataset[i] for i in range(min(size, len(dataset)))]
        collator = ChatCollator(processor, max_length=data.max_length, truncation=data.truncation,
                                padding_side=data.padding_side, events=events)
        call_each(plugins, "pre_collate", "masks", report, events, samples=samples)
        batch = collator(samples)
    except ValueError as exc:  # DataError, CollateError
        report.add("masks", "error", f"collating {data.train}: {exc}")
        return
    before = len(report.errors)
    call_each(plugins, "post_collate", "masks", report, events, batch=batch, samples=collator.last_samples)
    report_events(events, start, "masks", report, info=False)
    tokenizer = processor.tokenizer
    shown = [f"{sid}: " + " | ".join(repr(tokenizer.decode(span, clean_up_tokenization_spaces=False)[:120])
                                     for span in supervised_spans(labels, IGNORE_INDEX))
             for sid, labels in zip(collator.last_sample_ids, batch["labels"])]
    level = "ok" if len(report.errors) == before else "error"
    report.add("masks", level, f"{len(shown)} samples collated; what the loss sees:", shown)


# -- memory ----------------------------------------------------------------------------------------

def check_memory(recipe, config, weights, trainable, gpu_mem: float, report: Report, world_size: int = 1) -> None:
    report.memory = memory = estimate_memory(recipe, config, weights, trainable, gpu_mem, world_size)
    details = [f"{x['what']}: {x['arithmetic']} = {x['gib']:.2f} GiB" for x in memory["lines"]]
    total = memory["total_gib"]
    ranks = f", {memory['sharding']} over {world_size} ranks" if memory["sharded"] else ""
    summary = (f"about {total:.1f} GiB per GPU (batch {memory['batch']} x {memory['seq']} tokens{ranks}) against "
               f"--gpu-mem {gpu_mem:g} GiB")
    if total > gpu_mem:
        fixes = "" if memory["checkpointing"] else "activation_checkpointing = true, "
        fixes += "" if recipe.quantization.load_in_4bit else "quantization.load_in_4bit = true, "
        report.add("memory", "error", f"{summary}: does not fit; try {fixes}a smaller batch or data.max_length", details)
    else:
        report.add("memory", "warn" if total > 0.9 * gpu_mem else "ok", summary, details)


# -- learning rate and clipping --------------------------------------------------------------------

def lr_limits(total: int, lora: bool) -> tuple[float, float]:
    """(fine up to, error above). LoRA on Qwen3-VL: LLaMA-Factory and ms-swift use 1e-4; a 32B run
    exploded at 5e-4 (see recipes/pcb_qwen3vl.toml). Full fine-tuning: Qwen's own scripts use 1e-5."""
    if not lora:
        return 2e-5, 1e-4
    return (1e-4, 2e-4) if total >= 20e9 else (2e-4, 5e-4)


def check_learning_rate(recipe, total: int | None, report: Report) -> None:
    t = training_args_view(recipe)
    lr, lora = t.learning_rate, recipe.lora.enabled
    if total is None or total < 5e8:
        size = f"{total / 1e6:.2f}M-parameter" if total else "unknown-size"
        report.add("learning rate", "info", f"learning_rate {lr:g}: not judged for a {size} model (no reference below 0.5B)")
    else:
        fine, bad = lr_limits(total, lora)
        kind = "LoRA" if lora else "full fine-tuning"
        level = "ok" if lr <= fine else "warn" if lr <= bad else "error"
        advice = "" if level == "ok" else f"; lower it to {fine:g} or less (on Qwen3-VL-32B, 5e-4 exploded and 1e-4 trained)"
        report.add("learning rate", level, f"learning_rate {lr:g} for {kind} of a {total / 1e9:.1f}B model: "
                   f"references stay at or below {fine:g}{advice}")
    if not t.max_grad_norm:
        report.add("clipping", "warn", "training.max_grad_norm = 0: no gradient clipping (a common cause of "
                   "explosions); set 1.0, or 0.3 as recipes/pcb_qwen3vl.toml does")
    if not t.warmup_steps:
        report.add("warm-up", "info", "no warm-up: recipes/pcb_qwen3vl.toml warms up over 10% (warmup_steps = 0.1)")


# -- the engine ------------------------------------------------------------------------------------

def check_engine(training: dict, quantization, guards: dict, data, report: Report) -> None:
    from stabguard.engine_check import engine_of, findings

    found = findings(training, quantization, guards, data.train, text_only_image=data.text_only_image)
    for level, message in found:
        report.add("engine", level, message)
    if not any(level in ("error", "warn") for level, _ in found):
        report.add("engine", "ok", f"{engine_of(training)}: no known engine pitfall in this recipe")


def _deepspeed_of_invalid_recipe(recipe_path, report: Report) -> None:
    """An invalid recipe that asks for DeepSpeed still learns what its DeepSpeed config would run into."""
    from stabguard.engine_check import deepspeed_config, deepspeed_findings
    from stabguard.recipe import read_toml

    training = read_toml(recipe_path).get("training") or {}
    if isinstance(training, dict) and training.get("deepspeed"):
        for level, message in deepspeed_findings(deepspeed_config(training["deepspeed"]), training):
            report.add("engine", level, message)


# -- the whole preflight ---------------------------------------------------------------------------

def preflight(recipe_path: str | Path, *, gpu_mem: float = 80.0, rows: int = 64, images: int = 32,
              batch: int = 4, plugins=None, progress: ProgressFn | None = None, world_size: int = 1,
              probe_batches: int = 0) -> Report:
    """Every check of a recipe; read the result from ``report.findings`` (errors make ``stabguard check`` fail).
    ``progress(what, done, total)`` follows the reading of the data files, the long part on a large set.
    ``probe_batches > 0``: then load the model as the run would and probe that many real batches
    (``stabguard.probe``), unless the model files or the data already failed."""
    from stabguard.runner import prepare

    report = Report(str(recipe_path))
    try:
        recipe, plugins = prepare(recipe_path, plugins)
    except RecipeError as exc:
        report.recipe_invalid = True
        report.add("recipe", "error", f"{len(exc.errors)} error(s)", [f"{k}: {m}" for k, m in exc.errors])
        _deepspeed_of_invalid_recipe(recipe_path, report)
        return report
    enabled = plugins.enable_guards(recipe.guards)
    report.add("recipe", "ok", f"valid; guards: {', '.join(enabled) or 'none'}")
    events = EventLog()
    call_each(plugins, "configure", "guards", report, events, recipe=recipe)
    report_events(events, 0, "guards", report)
    check_engine(recipe.training, recipe.quantization, recipe.guards, recipe.data, report)
    _ensure_assets(recipe)
    local = check_model_files(recipe, report)
    data_ok = check_data(recipe, report, rows, images, progress)
    _model_checks(recipe, plugins, local, data_ok, report, events, gpu_mem, batch, progress, world_size)
    if probe_batches:
        _probe(recipe, plugins, local, data_ok, report, probe_batches, progress)
    return report


def _probe(recipe, plugins, local, data_ok, report, batches, progress) -> None:
    """The run's first step with its update vetoed (``stabguard.probe``), in a scratch output folder."""
    import sys
    import tempfile

    from stabguard.probe import probe

    from stabguard.engine_check import engine_spec

    why = "the model is not a local folder" if not local else "the data has errors (see data)" if not data_ok else None
    if why:
        report.add("probe", "info", f"not run: {why}")
        return
    if engine_spec(recipe.training).kind == "deepspeed" and "RANK" not in os.environ:
        report.add("probe", "warn", "not run: a DeepSpeed recipe is probed on its ranks, as it runs: "
                   f"torchrun --nproc-per-node N $(which stabguard) check {report.recipe} --probe")
        return
    if progress:
        progress("probe: loading the model and running the first batches", 0, 1)
    events = EventLog()
    with tempfile.TemporaryDirectory(prefix="stabguard-probe-") as scratch, \
            contextlib.redirect_stdout(sys.stderr):  # stdout stays the report's (--json)
        try:
            probe(recipe, plugins, report, events, batches=batches, output_dir=scratch)
        except Exception as exc:  # noqa: BLE001 - a probe that cannot run is a finding, the check's report stands
            report.add("probe", "error", f"the probe could not run the model: {type(exc).__name__}: {exc}")
    if progress:
        progress("probe: loading the model and running the first batches", 1, 1)


def _ensure_assets(recipe) -> None:
    """The tiny model and synthetic data a CPU recipe builds on first use (as ``stabguard run`` would)."""
    import sys

    from stabguard.models import ensure_model
    from stabguard.runner import ensure_data

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json
        ensure_model(recipe.model)
        ensure_data(recipe)


def _model_checks(recipe, plugins, local, data_ok, report, events, gpu_mem, batch, progress, world_size=1) -> None:
    config = model_config(recipe, local)
    if config is None:
        report.add("model", "warn", f"{recipe.model.name_or_path}: no local config and not a known Qwen3-VL size: "
                   "parameter table, memory and learning-rate checks skipped")
        return
    try:
        model, weights = build_skeleton(recipe, config)
    except ValueError as exc:  # a model_class transformers does not have; precision reports it too
        if not any(str(exc) in f.message for f in report.findings):
            report.add("model", "error", str(exc))
        return
    processor = _processor(recipe) if local else None
    start = len(events.events)
    call_each(plugins, "setup_model", "guards", report, events, model=model, processor=processor, recipe=recipe)
    report_events(events, start, "guards", report)
    optimizer = check_optimizer(recipe, model, plugins, report, events)
    check_guards_preflight(recipe, model, processor, optimizer, plugins, report, events)
    if processor is None:
        why = "could not be loaded (see model files)" if local else "is not available offline"
        report.add("masks", "info", f"not audited: the processor (tokenizer, chat template) {why}")
    elif not data_ok:
        report.add("masks", "info", "not audited: the data has errors (see data)")
    else:
        check_masks(recipe, processor, plugins, report, events, batch, progress)
    check_memory(recipe, config, weights, trainable_counts(model), gpu_mem, report, world_size)
    check_learning_rate(recipe, sum(weights.values()), report)


def _processor(recipe):
    from stabguard.models import load_processor

    try:
        return load_processor(recipe.model)
    except Exception:  # noqa: BLE001 - the model-files check has already said what is missing
        return None
