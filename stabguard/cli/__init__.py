"""The ``stabguard`` command: one module per sub-command."""

from __future__ import annotations

import importlib
import logging

import click

from stabguard import __version__

# sub-command name -> module exposing a click command named ``command``
COMMANDS = {
    "run": "stabguard.cli.run",
    "validate": "stabguard.cli.validate",
    "plugins": "stabguard.cli.plugins",
    "data": "stabguard.cli.data",
    "check": "stabguard.cli.check",
    "eval": "stabguard.cli.eval",
    "monitor": "stabguard.cli.monitor",
    "report": "stabguard.cli.report",
    "new-plugin": "stabguard.cli.new_plugin",
    "llamafactory": "stabguard.cli.llamafactory",
}


class LazyGroup(click.Group):
    """Imports a sub-command's module only when it runs (``validate`` need not import torch)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stabguard")
def main():
    """Guards that check and act: stable LoRA/QLoRA fine-tuning of vision-language models."""
    # bitsandbytes warns at import on every CPU machine about an optional 4-bit kernel package; the
    # precision guard says what really runs on CPU instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
