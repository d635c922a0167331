"""``stabguard validate RECIPE``: a one-line OK, or every error as ``dotted.key: message`` (exit 2)."""

from __future__ import annotations

import click

from stabguard.recipe import RecipeError


def report_recipe_error(exc: RecipeError) -> None:
    click.echo(f"{exc.path}: {len(exc.errors)} error(s)", err=True)
    for key, message in exc.errors:
        click.echo(f"  {key}: {message}", err=True)


@click.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
def command(recipe):
    """Check a recipe (sections, training arguments, guard options) without loading anything."""
    from stabguard.runner import prepare

    try:
        loaded, plugins = prepare(recipe)
    except RecipeError as exc:
        report_recipe_error(exc)
        raise SystemExit(2) from None
    enabled = [name for name, opts in loaded.guards.items() if opts.enabled]
    click.echo(f"OK {recipe}: model {loaded.model.name_or_path}, guards {', '.join(enabled) or 'none'}")
    for key, message in missing_data(loaded):
        click.echo(f"  note: {key}: {message}", err=True)


def missing_data(recipe) -> list[tuple[str, str]]:
    """Data files the run would not find (a recipe with ``data.synth`` generates its own on first use)."""
    from pathlib import Path

    from stabguard.data import missing_file

    if recipe.data.synth is not None:
        return []
    paths = {"data.train": recipe.data.train, "data.val": recipe.data.val}
    return [(key, missing_file(path)) for key, path in paths.items() if path and not Path(path).is_file()]
