"""``stabguard new-plugin NAME [--out DIR]``: a guard package that installs and passes its tests at once.

The package holds a pyproject with the ``stabguard`` entry point, the guard module (NAME, Options, the
guard class, ``register_guards``), tests written with ``stabguard.testing`` and a short README. The
templates are package data in ``stabguard/templates/plugin``.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from string import Template

import click

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def names(name: str) -> dict[str, str]:
    """The spellings of one guard name: ``loss_ceiling`` -> stabguard-loss-ceiling, stabguard_loss_ceiling, LossCeilingGuard."""
    from stabguard import __version__

    return {"name": name, "package": "stabguard-" + name.replace("_", "-"), "module": f"stabguard_{name}",
            "cls": "".join(part.title() for part in name.split("_")) + "Guard", "stabguard_version": __version__}


def render(name: str, out: Path) -> list[Path]:
    """Write the package for guard ``name`` into ``out``; return the files written."""
    values = names(name)
    root = files("stabguard.templates") / "plugin"
    targets = {"pyproject.toml.tmpl": "pyproject.toml", "README.md.tmpl": "README.md",
               "module.py.tmpl": f"{values['module']}.py", "tests/test_module.py.tmpl": f"tests/test_{name}.py"}
    written = []
    for source, target in targets.items():
        path = out / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(root.joinpath(source).read_text(encoding="utf-8")).substitute(values), encoding="utf-8")
        written.append(path)
    return written


@click.command("new-plugin")
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="folder to create (default: ./stabguard-NAME); must not exist or be empty")
def command(name, out):
    """Create a guard package NAME: pyproject with the entry point, the guard, its tests, a README."""
    if not NAME_PATTERN.match(name):
        raise click.BadParameter(f"{name!r}: use lower case letters, digits and _ (a recipe's [guards.{name}] "
                                 "table and a Python module are named after it), e.g. loss_ceiling", param_hint="NAME")
    target = Path(out) if out else Path(names(name)["package"])
    if target.exists() and any(target.iterdir()):
        raise click.BadParameter(f"{target} exists and is not empty", param_hint="--out")
    for path in render(name, target):
        click.echo(f"wrote {path}")
    click.echo(f"next: {next_command(target)}")


def next_command(target: Path) -> str:
    """Install the package with its test extra (pytest), then run its tests with that environment's Python."""
    return f"pip install -e '{target}[test]' && python -m pytest {target}"
