"""What to try after a STOP: the usual "if it still explodes" checklist, tied to this run's evidence.

The usual list is generic: check the data, lower the learning rate 1e-4 -> 5e-5, tighten clipping
0.3 -> 0.1, reduce the batch size 2 -> 1, check the model files. Each hint here says what this run
showed (which step went non-finite, how high the grad norm went and when, the learning rate and clip
in force, which samples a guard flagged), read from ``events.jsonl``, ``trainer_state.json`` and
``training_args.bin`` in the output directory, and orders the list by it: a run that is non-finite at
its very first step had no update yet, so the weights, their dtype or the data are suspect before the
learning rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from stabguard.diagnosis import brief, clip_value, num, peak_grad_norms, where_events
from stabguard.events import read_events
from stabguard.trainer_state import RunState, TrainerStateError, as_float, load_run, training_arg
from stabguard.where import Where

CHECK = "`stabguard check RECIPE`"


@dataclass
class Evidence:
    """What the run left behind that the hints point at."""

    stop_step: int | None = None
    first_bad: tuple[int, str] | None = None  # (step, what was non-finite)
    peak: tuple[int, float] | None = None  # (step, largest finite pre-clip grad norm)
    lr: float | None = None
    lr_at_stop: float | None = None
    clip: float | None = None
    batch: int | None = None
    accumulation: int | None = None
    samples: list[str] = field(default_factory=list)  # guard messages that name a sample
    precision: list[str] = field(default_factory=list)
    where: tuple[int, Where] | None = None  # the last anomalous step that said where it broke


def _run(output_dir: Path) -> RunState:
    try:
        return load_run(output_dir, retries=1, delay=0.05)
    except TrainerStateError:  # stopped before any state was written: the events still tell
        path = output_dir / "events.jsonl"
        events = read_events(path) if path.is_file() else []
        return RunState(output_dir=output_dir, source=path, global_step=0, max_steps=None, history=[], events=events)


def _first_bad(run: RunState) -> tuple[int, str] | None:
    """The first non-finite step: the nonfinite guard's events are per step, log lines only per logging step."""
    for event in run.events:
        values = event.get("values") or {}
        if event.get("guard") == "nonfinite" and event.get("kind") == "finding" and event.get("step"):
            if "cause" not in values:
                return event["step"], "non-finite values"
            numbers = ", ".join(f"{k}={values[k]}" for k in ("loss", "grad_norm") if k in values)
            return event["step"], brief(f"{values['cause']} ({numbers})" if numbers else values["cause"])
    for entry in run.history:
        values = {k: as_float(entry.get(k)) for k in ("loss", "grad_norm")}
        bad = [f"{k} {v}" for k, v in values.items() if v is not None and not math.isfinite(v)]
        if bad:
            return int(entry.get("step", 0)), " and ".join(bad)
    return None


def _stop_step(run: RunState, stop_reason: str | None) -> int | None:
    """The step of the run's stop event; for a run without one, the core's "step N: ..." reason."""
    steps = [e["step"] for e in run.events if e.get("kind") == "stop" and isinstance(e.get("step"), int)]
    if steps:
        return steps[-1]
    found = re.match(r"step (\d+)", stop_reason or "")
    return int(found.group(1)) if found else None


def gather(output_dir: str | Path, stop_reason: str | None) -> Evidence:
    output_dir = Path(output_dir)
    run = _run(output_dir)
    ev = Evidence(stop_step=_stop_step(run, stop_reason), first_bad=_first_bad(run), clip=clip_value(run))
    norms = [(s, v) for s, v in peak_grad_norms(run) if math.isfinite(v)]
    ev.peak = max(norms, key=lambda p: p[1]) if norms else None
    rates = [(s, v) for s, v in run.column("learning_rate") if math.isfinite(v)]
    before = [v for s, v in rates if ev.stop_step is None or s <= ev.stop_step]
    ev.lr_at_stop = before[-1] if before else None
    ev.lr = training_arg(output_dir, "learning_rate") or (max(v for _, v in rates) if rates else None)
    ev.batch = training_arg(output_dir, "per_device_train_batch_size")
    ev.accumulation = training_arg(output_dir, "gradient_accumulation_steps")
    ev.samples = [e["message"] for e in run.events if e.get("kind") != "info" and
                  ((e.get("values") or {}).get("sample") or (e.get("values") or {}).get("samples"))]
    ev.precision = [e["message"] for e in run.events if e.get("guard") == "precision" and e.get("kind") == "alert"]
    located = where_events(run)
    if located:
        ev.where = located[-1].get("step"), Where.from_values(located[-1]["values"]["where"])
    return ev


# -- one hint per item of the checklist ------ -----------------------------------------------------

def data_hint(ev: Evidence) -> str:
    if ev.samples:
        more = f" and {len(ev.samples) - 1} more" if len(ev.samples) > 1 else ""
        return f"data: guards flagged samples in this run: {ev.samples[0][:200]}{more}; fix or remove those rows."
    if ev.first_bad:
        step, what = ev.first_bad
        return (f"data: step {step} was the first non-finite step ({what}); a corrupt image or a broken text in that "
                f"step's batch is the first suspect: {CHECK} decodes the images and audits the label masks.")
    where = f" before step {ev.stop_step}" if ev.stop_step else ""
    return f"data: no sample was flagged{where}; {CHECK} decodes a sample of images and shows what the loss sees."


def lr_hint(ev: Evidence) -> str | None:
    if ev.lr is None:
        return None
    at = (f" ({num(ev.lr_at_stop)} at the last log line before the stop)"
          if ev.lr_at_stop is not None and not math.isclose(ev.lr_at_stop, ev.lr) else "")
    after = ""
    if ev.first_bad and ev.first_bad[0] <= 1:
        after = " (step 1 went non-finite before any update, so the learning rate did not cause that step)"
    return (f"learning rate: learning_rate = {num(ev.lr)}{at}{after}; halve it: learning_rate = {num(ev.lr / 2)} "
            "(e.g. 1e-4 -> 5e-5), and keep a warm-up (warmup_steps = 0.1).")


def clip_hint(ev: Evidence) -> str:
    peak = f"the pre-clip grad norm peaked at {num(ev.peak[1])} at step {ev.peak[0]}" if ev.peak else "no finite grad norm was logged"
    nan = (f"; clipping cannot repair the non-finite gradient of step {ev.first_bad[0]}" if ev.first_bad else "")
    if ev.clip is None:
        return f"clipping: none was applied and {peak}{nan}; set max_grad_norm = 1.0, or 0.3 as recipes/pcb_qwen3vl.toml does."
    return (f"clipping: max_grad_norm = {num(ev.clip)} and {peak}{nan}; tighten it: max_grad_norm = {num(ev.clip / 3)} "
            "(e.g. 0.3 -> 0.1).")


def batch_hint(ev: Evidence) -> str | None:
    if not ev.batch:
        return None
    accumulation = ev.accumulation or 1
    if ev.batch == 1:
        return f"batch size: already 1 per device (x {accumulation} accumulation); nothing to lower here."
    smaller = max(ev.batch // 2, 1)
    return (f"batch size: {ev.batch} per device x {accumulation} accumulation; halve it and double the accumulation: "
            f"per_device_train_batch_size = {smaller}, gradient_accumulation_steps = {accumulation * ev.batch // smaller} "
            f"keeps the effective batch of {ev.batch * accumulation} with less padding and activation memory per step.")


def where_hint(ev: Evidence) -> str | None:
    """What the modules behind the last anomalous step suggest."""
    if ev.where is None:
        return None
    step, where = ev.where
    vision = [m for m in [*where.nonfinite, *(m for m, _, _ in where.modules)] if m.startswith("visual")]
    if vision:
        return (f"where: at step {step} gradients reached the vision tower ({vision[0]}): is it really frozen? "
                "[guards.vision_freeze] audits it; train_projector = false keeps the merger frozen too.")
    if where.first_nonfinite_output:
        return (f"where: at step {step} the first non-finite output was {where.first_nonfinite_output}'s; with finite "
                "inputs that points at its weights or the precision (fp16 overflow), not at the data.")
    if where.nonfinite:
        module = next(iter(where.nonfinite))
        return f"where: at step {step} the NaN/Inf gradients start in {module}; {where.brief()}."
    if where.modules and where.modules[0][2] >= 0.8:
        module, part, share = where.modules[0]
        return (f"where: at step {step} {share:.0%} of the squared grad norm came from {part} of {module} alone: "
                "a single bad sample? The step's samples are in its event.")
    return None


def files_hint(ev: Evidence) -> str:
    precision = f" The precision guard warned: {ev.precision[0][:200]}" if ev.precision else ""
    files = ("config.json, preprocessor_config.json, the tokenizer files, the chat template and every shard in the "
             f"index: {CHECK}.{precision}")
    if ev.first_bad and ev.first_bad[0] <= 1:
        return (f"model files: non-finite already at step {ev.first_bad[0]}, before any update: the weights as "
                f"loaded, their dtype or the data are at fault, not the optimizer. Check {files}")
    return f"model files: if the above does not help, check {files}"


def hints_for(output_dir: str | Path, stop_reason: str | None) -> list[str]:
    """Hints for a stopped run, most likely cause first, each with the evidence behind it."""
    ev = gather(output_dir, stop_reason)
    if ev.first_bad and ev.first_bad[0] <= 1:
        order = [where_hint(ev), files_hint(ev), data_hint(ev), lr_hint(ev), clip_hint(ev), batch_hint(ev)]
    else:
        order = [where_hint(ev), data_hint(ev), lr_hint(ev), clip_hint(ev), batch_hint(ev), files_hint(ev)]
    return [hint for hint in order if hint]
