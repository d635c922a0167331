"""``stabguard llamafactory train CONFIG [key=value ...]``: LLaMA-Factory's SFT with the guarded step.

Exit codes as ``stabguard run``: 0 done, 1 refused (FSDP2 under an accelerate too old, ...), 2 bad
``stabguard:`` settings or a ``resume_from_checkpoint`` that does not verify, 3 a guard stopped the run.
Under torchrun, each worker exits so and torchrun reports it (torchrun itself exits 1).
"""

from __future__ import annotations

import click


@click.group("llamafactory")
def command():
    """LLaMA-Factory's training, guarded (needs llamafactory installed)."""


@command.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def train(config, overrides):
    """Train as `llamafactory-cli train CONFIG` would; guards from the config's `stabguard:` key."""
    from pydantic import ValidationError

    from stabguard.checkpoints import CheckpointError
    from stabguard.integrations.llamafactory import train as run_train
    from stabguard.verdict import GuardError

    try:
        workers = run_train([config, *overrides])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "llamafactory":
            raise click.ClickException("LLaMA-Factory is not installed here: pip install llamafactory") from None
        raise
    except ValidationError as exc:
        click.echo(f"{config}: stabguard settings: {exc}", err=True)
        raise SystemExit(2) from None
    except CheckpointError as exc:  # a resume_from_checkpoint that does not verify (2), a save that failed (1)
        click.echo(f"stabguard: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except GuardError as exc:
        click.echo(f"stabguard: refused: {exc}", err=True)
        raise SystemExit(1) from None
    if workers:  # started under torchrun (FORCE_TORCHRUN=1, several devices): their exit status
        raise SystemExit(workers)
