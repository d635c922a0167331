"""``stabguard check RECIPE [--gpu-mem 80] [--world-size 8] [--probe [--batches 2]] [--json]``: every
preflight, no training; ``--probe`` also runs the first batches forward and backward (``stabguard.probe``).
``stabguard check RUN_DIR``: a plain Hugging Face run directory, as far as it goes (``stabguard.run_dir``).

Under ``torchrun`` (``torchrun --nproc-per-node N $(which stabguard) check RECIPE --probe``) every rank runs
the probe with the recipe's engine and rank 0 prints the report, which every rank shares.

Exit codes: 0 when nothing is wrong (warnings allowed), 1 on any error, 2 when the recipe itself is
invalid (as ``stabguard validate``).
"""

from __future__ import annotations

import json
import os

import click

MARKS = {"ok": "ok", "info": "--", "warn": "WARN", "error": "ERROR"}
EXIT_ERRORS, EXIT_RECIPE = 1, 2


def render(report) -> str:
    """The report for a person: one line per finding, its details indented under it."""
    lines = [f"stabguard check {report.recipe}"]
    for f in report.findings:
        lines.append(f"{MARKS[f.level]:>6}  {f.check}: {f.message}")
        lines += [f"{'':8}  {detail}" for detail in f.details]
    errors = len(report.errors)
    warnings = sum(f.level == "warn" for f in report.findings)
    lines.append(f"{errors} error(s), {warnings} warning(s)" + ("" if errors else ": ready to run"))
    return "\n".join(lines)


@click.command("check")
@click.argument("recipe", type=click.Path())
@click.option("--gpu-mem", type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True,
              help="GiB of memory per GPU the run will have (80 for an H100/A100 80GB)")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="ranks the run will have (FSDP2 and ZeRO split memory over them)  [default: torchrun's, else 1]")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (for scripts)")
@click.option("--rows", type=click.IntRange(min=1), default=64, show_default=True, help="data rows checked per file")
@click.option("--images", type=click.IntRange(min=0), default=32, show_default=True, help="images decoded per file")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="conversations collated for the label-mask audit")
@click.option("--probe", "probe", is_flag=True,
              help="also load the model as the run will and run the first batches forward and backward: "
                   "gradients that reach nothing, fp16 headroom, accumulation scaling, pixel range, known-bad stacks")
@click.option("--batches", type=click.IntRange(min=1), default=2, show_default=True,
              help="batches the probe runs (2 or more for the accumulation check)")
def command(recipe, gpu_mem, world_size, as_json, rows, images, batch, probe, batches):
    """Check a recipe before spending GPU hours: model files, data, label masks, parameters, memory, LR.

    RECIPE may also be a plain Hugging Face run directory (trainer_state.json, training_args.bin): its
    arguments, this machine's stack and its log history are checked as far as they go without a recipe."""
    from stabguard.check import preflight
    from stabguard.cli.run import close_process_group
    from stabguard.progress import command_progress
    from stabguard.run_dir import check_run_dir, is_run_dir

    if is_run_dir(recipe):
        report = check_run_dir(recipe, probe=probe)
        click.echo(json.dumps(report.as_json(), indent=1) if as_json else render(report))
        raise SystemExit(EXIT_ERRORS if report.errors else 0)
    if os.path.isdir(recipe):
        click.echo(f"stabguard check: {recipe} is a folder but not a Hugging Face run directory (no "
                   "trainer_state.json or training_args.bin, at the top or in a checkpoint-N/ folder): give a "
                   "recipe .toml or a run's output_dir", err=True)
        raise SystemExit(EXIT_RECIPE)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    with command_progress("the check did not finish") as progress:
        report = preflight(recipe, gpu_mem=gpu_mem, rows=rows, images=images, batch=batch, progress=progress,
                           world_size=world_size, probe_batches=batches if probe else 0)
    close_process_group()  # the probe under torchrun: every rank holds the same report
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(report.as_json(), indent=1) if as_json else render(report))
    if report.recipe_invalid:
        raise SystemExit(EXIT_RECIPE)
    if report.errors:
        raise SystemExit(EXIT_ERRORS)
