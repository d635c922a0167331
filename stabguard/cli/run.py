"""``stabguard run RECIPE``: train; a STOP verdict exits 3 with the reason; bad data or a refused set-up exits 1."""

from __future__ import annotations

import click

from stabguard.recipe import RecipeError
from stabguard.verdict import GuardError

EXIT_RECIPE, EXIT_GUARD, EXIT_STOPPED = 2, 1, 3


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--resume", "resume", default=None, metavar="CHECKPOINT",
              help="resume from a checkpoint folder, or 'last' for the newest in output_dir")
def command(recipe, resume):
    """Fine-tune as the recipe says, with its guards enabled."""
    from stabguard.cli.validate import report_recipe_error
    from stabguard.collate import CollateError
    from stabguard.data import DataError
    from stabguard.runner import run

    try:
        result = run(recipe, resume=True if resume == "last" else resume)
    except RecipeError as exc:
        report_recipe_error(exc)
        raise SystemExit(EXIT_RECIPE) from None
    except (GuardError, DataError, CollateError) as exc:
        click.echo(f"stabguard: refused: {exc}", err=True)
        raise SystemExit(EXIT_GUARD) from None
    if not result.ok:
        click.echo(f"stabguard: STOPPED at {result.stop_reason}", err=True)
        click.echo(f"stabguard: last good state saved under {result.output_dir}; events in "
                   f"{result.output_dir / 'events.jsonl'}", err=True)
        from stabguard.hints import hints_for

        for hint in hints_for(result.output_dir, result.stop_reason):
            click.echo(f"stabguard: try: {hint}", err=True)
        raise SystemExit(EXIT_STOPPED)
    click.echo(f"stabguard: done: {result.global_step} steps ({result.skipped_steps} skipped); "
               f"outputs in {result.output_dir}")
