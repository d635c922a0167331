"""``stabguard data``: make and inspect datasets."""

from __future__ import annotations

import time
from pathlib import Path

import click

WORKERS_HELP = "Processes to use (default: the cores available, at most 16); 1 runs in this process."


def _workers(workers: int | None) -> int:
    from stabguard.data.workers import default_workers

    return workers or default_workers()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@click.group(name="data")
def command() -> None:
    """Make datasets in the JSONL conversation format stabguard trains on."""


@command.command(name="synth-pcb")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--n", type=click.IntRange(min=1), default=48, show_default=True, help="Number of boards.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--size", type=click.IntRange(min=64), default=256, show_default=True, help="Image side in pixels.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True,
              help="Share of boards written to val.jsonl.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
def synth_pcb_command(out_dir: str, n: int, seed: int, size: int, val_fraction: float, workers: int | None) -> None:
    """Synthetic DeepPCB-style boards with six defect classes, as train/val JSONL conversations."""
    from stabguard.data.synth import synth_pcb
    from stabguard.progress import command_progress, duration

    workers, start = _workers(workers), time.perf_counter()
    with command_progress(f"nothing written to {Path(out_dir) / 'train.jsonl'}") as progress:
        written = synth_pcb(out_dir, n, seed=seed, size=size, val_fraction=val_fraction, workers=workers,
                            progress=progress)
    took = duration(time.perf_counter() - start)
    click.echo(f"generated {n} boards in {took} ({_count(workers, 'worker')})")
    click.echo(f"wrote {written['images']} images ({size}x{size}) to {written['out_dir']}/images")
    click.echo(f"  train: {written['train']} ({written['train_rows']} rows)")
    if written["val"]:
        click.echo(f"  val:   {written['val']} ({written['val_rows']} rows)")
    click.echo(f"  annotations: {written['annotations']}; README: {written['readme']}")
    counts = ", ".join(f"{label} {count}" for label, count in written["defects"].items())
    click.echo(f"  defects: {counts}")


@command.command(name="import-deeppcb")
@click.option("--src", required=True, type=click.Path(exists=True, file_okay=False),
              help="DeepPCB's PCBData folder, or any folder of images with 'x1 y1 x2 y2 type' .txt files.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True,
              help="Share of boards for val.jsonl when the source has no test.txt split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the split and the conversation styles.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
def import_deeppcb_command(src: str, out_dir: str, val_fraction: float, seed: int, workers: int | None) -> None:
    """Real PCB data in: DeepPCB-style annotations to train/val JSONL conversations (images copied)."""
    from stabguard.data import DataError
    from stabguard.data.deeppcb import import_deeppcb
    from stabguard.progress import command_progress, duration

    workers, start = _workers(workers), time.perf_counter()
    try:
        with command_progress(f"nothing written to {Path(out_dir) / 'train.jsonl'}") as progress:
            written = import_deeppcb(src, out_dir, val_fraction=val_fraction, seed=seed, workers=workers,
                                     progress=progress)
    except DataError as exc:
        click.echo(f"stabguard data import-deeppcb: {exc}", err=True)
        raise SystemExit(2) from None
    split = "test.txt" if written["official_split"] else f"random (seed {seed})"
    boards, took = written["train_rows"] + written["val_rows"], duration(time.perf_counter() - start)
    click.echo(f"imported {boards} boards into {written['out_dir']} ({split} split) in {took} "
               f"({_count(workers, 'worker')})")
    click.echo(f"  train: {written['train']} ({written['train_rows']} rows)")
    click.echo(f"  val:   {written['val']} ({written['val_rows']} rows)")
    click.echo("  defects: " + ", ".join(f"{label} {count}" for label, count in written["defects"].items()))


@command.command(name="export")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "to", required=True, type=click.Choice(["llamafactory", "ms-swift", "axolotl"]),
              help="The framework whose dataset format to write.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--name", default=None, help="The dataset's name (default: SRC's file name without .jsonl).")
def export_command(src: str, to: str, out_dir: str, name: str | None) -> None:
    """SRC (stabguard's JSONL) in the dataset format of LLaMA-Factory, ms-swift or Axolotl."""
    from stabguard.data.export import export
    from stabguard.data.jsonl import DataError

    try:
        written = export(src, to, out_dir, name)
    except DataError as exc:
        raise click.ClickException(f"{src}: {exc}") from None
    for path in written:
        click.echo(f"wrote {path}")
