"""The probe inside a framework's own command: ``probe: true`` in its stabguard settings.

``stabguard check --probe`` builds the trainer from a recipe; a framework builds its own, from its own
config. With ``probe: true`` (Axolotl: ``stabguard: {probe: true}``; LLaMA-Factory: the override
``stabguard.probe=true``; ms-swift: ``STABGUARD_PROBE=1``) the framework's command builds everything as
for training (its model, LoRA, data, collator, engine, on every rank), then the guarded trainer runs the
first optimizer step with its update vetoed (:class:`stabguard.probe.StepRecorder`), in a scratch output
folder, prints the report ``stabguard check --probe`` prints, and exits: 0, or 1 when a finding is an
error. Nothing is trained or saved.
"""

from __future__ import annotations

import tempfile
from typing import Any, NoReturn

from stabguard.findings import Report
from stabguard.probe import PROBE_PLUGIN, StepRecorder, report_seen, trainer_facts

EXIT_ERRORS = 1


def start(plugins, trainer_args: tuple, trainer_kwargs: dict[str, Any]) -> StepRecorder:
    """Before the trainer is built: the recorder joins its plugins (its ``setup_model`` must see the
    model), and the run's output folder becomes a scratch one (nothing of the probe lands in the run's)."""
    recorder = StepRecorder(plugins, None)
    plugins.register(recorder, PROBE_PLUGIN, source="core")
    args = trainer_kwargs.get("args", trainer_args[1] if len(trainer_args) > 1 else None)
    if args is not None:
        args.output_dir = tempfile.mkdtemp(prefix="stabguard-probe-")
    return recorder


def restrict(trainer) -> None:
    """One optimizer step (the framework's own accumulation), nothing saved or evaluated."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    trainer.args.max_steps = 1
    trainer.args.save_strategy = SaveStrategy.NO
    trainer.args.eval_strategy = IntervalStrategy.NO


def finish(trainer, recorder: StepRecorder, framework: str) -> NoReturn:
    """After the probe's step: the report on rank 0 (every rank holds the same), then exit."""
    from stabguard.cli.check import render

    report = Report(recipe=f"{framework} (probe of the framework's own run)")
    if recorder.seen is None:
        why = trainer.stop_reason or "no batch came"
        report.add("probe", "error", f"the probe's step did not run: {why}")
    else:
        report_seen(recorder.seen, trainer_facts(trainer), trainer, recorder.processor, report)
    if trainer.is_world_process_zero():
        print(render(report), flush=True)
    raise SystemExit(EXIT_ERRORS if report.errors else 0)
