"""``stabguard plugins [--hook NAME]``: every plugin, its version, source and hooks."""

from __future__ import annotations

import click

from stabguard.manager import HOOK_NAMES, Plugins


def plugin_rows(plugins: Plugins) -> list[dict]:
    """One row per plugin module; a guard's hooks (from its default instance) are listed with it."""
    rows = []
    for name, info in plugins.info.items():
        hooks = set(plugins.hooks_of(name))
        guards = [g for g in plugins.guards.values() if g.provided_by == name]
        for guard in guards:
            instance = guard.factory(guard.options())
            hooks |= {h for h in HOOK_NAMES if hasattr(getattr(instance, h, None), "stabguard_impl")}
        rows.append({"name": name, "version": info.version, "source": info.source,
                     "guards": [g.name for g in guards], "hooks": sorted(hooks)})
    return rows


@click.command("plugins")
@click.option("--hook", "hook", default=None, help="only plugins implementing this hook")
@click.option("--recipe", default=None, type=click.Path(dir_okay=False), help="include the recipe's plugins")
def command(hook, recipe):
    """List every plugin stabguard loads: name, version, source and the hooks it implements."""
    modules, block, near = [], [], []
    if recipe:
        from pathlib import Path

        from stabguard.recipe import plugin_lists

        modules, block = plugin_lists(recipe)
        near = [Path(recipe).parent]
    plugins = Plugins.for_recipe(modules, block, near=near)
    off = plugins.off_unless_named()
    if hook and hook not in HOOK_NAMES:
        raise click.BadParameter(f"unknown hook {hook!r}; hooks: {', '.join(HOOK_NAMES)}", param_hint="--hook")
    for row in plugin_rows(plugins):
        if hook and hook not in row["hooks"]:
            continue
        names = [f"{g} (off unless the recipe has [guards.{g}])" if g in off else g for g in row["guards"]]
        guards = f" guards: {', '.join(names)}" if names else ""
        click.echo(f"{row['name']} {row['version']} ({row['source']}){guards}")
        click.echo(f"    hooks: {', '.join(row['hooks'])}")
