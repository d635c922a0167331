"""``stabguard data``: make and inspect datasets."""

from __future__ import annotations

import click

from stabguard.data.synth import synth_pcb


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
def synth_pcb_command(out_dir: str, n: int, seed: int, size: int, val_fraction: float) -> None:
    """Synthetic DeepPCB-style boards with six defect classes, as train/val JSONL conversations."""
    written = synth_pcb(out_dir, n, seed=seed, size=size, val_fraction=val_fraction)
    click.echo(f"wrote {written['images']} images ({size}x{size}) to {written['out_dir']}/images")
    click.echo(f"  train: {written['train']} ({written['train_rows']} rows)")
    if written["val"]:
        click.echo(f"  val:   {written['val']} ({written['val_rows']} rows)")
    click.echo(f"  annotations: {written['annotations']}")
    counts = ", ".join(f"{label} {count}" for label, count in written["defects"].items())
    click.echo(f"  defects: {counts}")
