"""``stabguard run RECIPE``: train as the recipe says.

Exit codes: 0 done; 1 a guard refused (set-up, data: a GuardError), or a checkpoint's save failed; 2 recipe
errors, or a ``--resume PATH`` that does not verify; 3 a guard stopped the run (a STOP verdict); 4 a plugin's
hook crashed (its exception, with the hook, plugin and rank). With 1, 3 and 4 during training the last
verified state is saved as a checkpoint when a step ran.
"""

from __future__ import annotations

import click

from stabguard.recipe import RecipeError
from stabguard.verdict import GuardError, HookError

EXIT_RECIPE, EXIT_GUARD, EXIT_STOPPED, EXIT_CRASHED = 2, 1, 3, 4


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--resume", "resume", default=None, metavar="CHECKPOINT",
              help="resume from a checkpoint folder (verified against its manifest); 'last': the newest one in "
                   "output_dir that verifies; 'auto': that one if there is one, else start fresh (for torchrun "
                   "--max-restarts)")
@click.option("--heal", is_flag=True, help="with --resume, from a STOP's checkpoint: apply the recovery's next "
                                          "remedy (quarantine, cool-down, tighter clip) at the first step")
def command(recipe, resume, heal):
    """Fine-tune as the recipe says, with its guards enabled."""
    from stabguard.checkpoints import CheckpointError
    from stabguard.cli.validate import report_recipe_error
    from stabguard.collate import CollateError
    from stabguard.data import DataError
    from stabguard.runner import exception_text, run

    if heal and not resume:
        raise click.UsageError("--heal applies a remedy to a resumed run: give --resume too")
    try:
        result = run(recipe, resume=resume, heal=heal)
    except RecipeError as exc:
        report_recipe_error(exc)
        raise SystemExit(EXIT_RECIPE) from None
    except CheckpointError as exc:  # a --resume PATH that does not verify (2), a save that failed (1)
        click.echo(f"stabguard: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except (GuardError, DataError, CollateError) as exc:
        click.echo(f"stabguard: refused: {exception_text(exc)}", err=True)
        raise SystemExit(EXIT_GUARD) from None
    except HookError as exc:
        click.echo(f"stabguard: a plugin failed: {exc}", err=True)
        raise SystemExit(EXIT_CRASHED) from None
    except RuntimeError as exc:
        if "disagreement on list length" in str(exc):  # DeepSpeed ZeRO-3: the ranks ran different modules
            click.echo("stabguard: the ranks ran different modules in one step (DeepSpeed ZeRO-3), most often "
                       "a text-only batch on one rank while another has images; fix: [data] text_only_image = "
                       "true (`stabguard check RECIPE` flags such data before step 1)", err=True)
        raise
    close_process_group()
    if not result.ok:
        word = {"crash": "a plugin failed", "refused": "refused"}.get(result.error, "STOPPED")
        click.echo(f"stabguard: {word} at {result.stop_reason}", err=True)
        click.echo(f"stabguard: {saved_state(result)}; events in {result.output_dir / 'events.jsonl'}", err=True)
        from stabguard.hints import hints_for

        for hint in hints_for(result.output_dir, result.stop_reason):
            click.echo(f"stabguard: try: {hint}", err=True)
        verdict = result.trainer.stop_verdict if result.trainer is not None else None
        if verdict is not None and verdict.healable:
            click.echo(f"stabguard: try: stabguard run {recipe} --resume last --heal  (goes on from the saved "
                       f"state with the next remedy: {result.trainer.guarded.recovery.next_remedy()})", err=True)
        raise SystemExit({"crash": EXIT_CRASHED, "refused": EXIT_GUARD}.get(result.error, EXIT_STOPPED))
    from stabguard.diagnosis import dropped_text

    click.echo(f"stabguard: done: {result.global_step} steps ({dropped_text(result.skipped_steps, result.rollbacks)}); "
               f"outputs in {result.output_dir}")


def close_process_group() -> None:
    """Under torchrun/accelerate: left open, the backend's threads can abort the process at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def saved_state(result) -> str:
    """What the STOP kept, from its event: the checkpoint and the step whose state it holds."""
    events = result.trainer.events.of_kind("stop") if result.trainer is not None else []
    values = events[-1]["values"] if events else {}
    if not values.get("checkpoint"):
        return "no step had run: nothing to save"
    if values.get("verified"):
        return (f"the last verified state (after step {values['restored_step']}) is saved as {values['checkpoint']}; "
                f"resume with --resume {values['checkpoint']}")
    return f"the current state (not verified: [snapshots] every = 0) is saved as {values['checkpoint']}"
