"""The plugin manager: built-in guards, entry points, recipe-listed modules, blocking.

Built-in guards (the modules in ``plugins/``, installed as ``stabguard.plugins``) are loaded through the
same function as every other plugin module; only their ``source`` differs. Third-party plugins come
from the entry-point group ``stabguard`` (switched off by ``STABGUARD_DISABLE_PLUGIN_AUTOLOAD=1``) or
from a recipe's ``plugins = ["my_module"]`` (importable, or a module beside the recipe or in the current
folder). A guard that came in through an entry point is off unless the recipe names it
(``off_unless_named``); every entry-point plugin is announced at the start of a run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from stabguard import hookspecs
from stabguard.options import GuardOptions
from stabguard.verdict import GuardError, HookError, HookRefusal

ENTRY_POINT_GROUP = "stabguard"
AUTOLOAD_ENV = "STABGUARD_DISABLE_PLUGIN_AUTOLOAD"

BUILTIN_PLUGINS = {
    "mask": "stabguard.plugins.mask",
    "vision_freeze": "stabguard.plugins.vision_freeze",
    "grad_norm": "stabguard.plugins.grad_norm",
    "nonfinite": "stabguard.plugins.nonfinite",
    "optim8bit": "stabguard.plugins.optim8bit",
    "spike": "stabguard.plugins.spike",
    "divergence": "stabguard.plugins.divergence",
    "precision": "stabguard.plugins.precision",
}

HOOK_NAMES = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "stabguard_spec"))


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in" | "entry point" | "recipe" | "registered"
    version: str
    plugin: Any


@dataclass
class GuardSpec:
    name: str
    options: type[GuardOptions]
    factory: Callable[[GuardOptions], Any]
    provided_by: str
    instance: Any = field(default=None, repr=False)


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class Plugins:
    """A pluggy manager plus what stabguard knows about each plugin and guard."""

    def __init__(self, block: Iterable[str] = ()):
        self.pm = pluggy.PluginManager("stabguard")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.guards: dict[str, GuardSpec] = {}
        self.near: list[Path] = []  # folders a recipe module may sit in: the recipe's, the current one
        self.requested: set[str] = set()  # entry-point plugins the recipe also names in `plugins`
        for name in block:
            self.pm.set_blocked(name)

    @classmethod
    def for_recipe(cls, modules: Iterable[str] = (), block: Iterable[str] = (), *,
                   builtins: bool = True, autoload: bool | None = None,
                   near: Iterable[str | Path] = ()) -> Plugins:
        """Built-ins, then entry points (unless disabled), then the recipe's modules; guards collected.

        ``near``: folders (the recipe's) searched, after ``sys.path`` and before the current folder, for a
        recipe module that is not importable otherwise.
        """
        plugins = cls(block=block)
        plugins.near = [Path(p) for p in near] + [Path.cwd()]
        if builtins:
            for name, module in BUILTIN_PLUGINS.items():
                plugins.load_module(module, name=name, source="built-in")
        if autoload if autoload is not None else not autoload_disabled():
            plugins.load_entry_points()
        for module in modules:
            plugins.load_module(module, source="recipe")
        plugins.collect_guards()
        return plugins

    @property
    def hook(self):
        return self.pm.hook

    def register(self, plugin: Any, name: str, source: str = "registered", version: str = "") -> None:
        """Register a plugin object (module or instance); a blocked name is silently left out."""
        if self.pm.is_blocked(name):
            return
        self.pm.register(plugin, name=name)
        self._name_failures(plugin)
        self.info[name] = PluginInfo(name, source, version or _version_of(plugin), plugin)

    def _name_failures(self, plugin: Any) -> None:
        """An exception from any of the plugin's hooks becomes a HookError naming the hook and plugin."""
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _naming_failures(impl.function, caller.name, impl.plugin_name)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.info.pop(name, None)

    def load_module(self, module_path: str, *, name: str | None = None, source: str) -> ModuleType | None:
        name = name or module_path
        if self.pm.is_blocked(name) or self.pm.has_plugin(name):
            return None
        try:
            module = _import(module_path, self.near if source == "recipe" else [])
        except ImportError as exc:
            where = f" (also looked in {', '.join(str(p) for p in self.near)})" if source == "recipe" else ""
            raise ImportError(f"cannot import plugin module {module_path!r} ({source}): {exc}{where}") from exc
        if self.pm.is_registered(module):  # a recipe naming a module its entry point already loaded
            self.requested.add(self.pm.get_name(module))
            return module
        self.register(module, name=name, source=source)
        return module

    def load_entry_points(self) -> int:
        before = set(self.pm.get_plugins())
        count = self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin, dist in self.pm.list_plugin_distinfo():
            if plugin in before:
                continue
            self._name_failures(plugin)
            name = self.pm.get_name(plugin)
            self.info[name] = PluginInfo(name, "entry point", f"{dist.metadata['name']} {dist.version}", plugin)
        return count

    def collect_guards(self) -> None:
        """Ask every plugin for its guards (``register_guards``)."""
        for impl in self.pm.hook.register_guards.get_hookimpls():
            def register(name, options, factory, _by=impl.plugin_name):
                if self.pm.is_blocked(name):
                    return
                if name in self.guards and self.guards[name].provided_by != _by:
                    raise ValueError(f"guard {name!r} is registered by both {self.guards[name].provided_by!r} and {_by!r}")
                self.guards[name] = GuardSpec(name, options, factory, _by)

            impl.function(**{arg: register for arg in impl.argnames})

    def guard_options(self) -> dict[str, type[GuardOptions]]:
        return {name: spec.options for name, spec in self.guards.items()}

    def off_unless_named(self) -> set[str]:
        """Guards that stay off unless the recipe has their ``[guards.<name>]`` table: those that came in
        through an entry point whose module the recipe does not list in ``plugins``. Installing a package
        must not change what an unrelated run does (skip its steps); built-ins and recipe modules are on."""
        return {name for name, spec in self.guards.items()
                if self.info[spec.provided_by].source == "entry point" and spec.provided_by not in self.requested}

    def entry_point_plugins(self) -> list[PluginInfo]:
        """The plugins that came in through an entry point (announced at the start of a run)."""
        return [info for info in self.info.values() if info.source == "entry point"]

    def enable_guards(self, options: dict[str, GuardOptions]) -> list[str]:
        """Build and register each guard whose options say ``enabled``; return the enabled names."""
        enabled = []
        for name, spec in self.guards.items():
            opts = options.get(name) or spec.options()
            if not opts.enabled:
                continue
            spec.instance = spec.factory(opts)
            self.register(spec.instance, name=f"guard:{name}", source=self.info[spec.provided_by].source,
                          version=self.info[spec.provided_by].version)
            enabled.append(name)
        return enabled

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])


def _naming_failures(function: Callable, hook: str, plugin: str) -> Callable:
    if inspect.isgeneratorfunction(function) or getattr(function, "_stabguard_named", False):
        return function

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except HookError:
            raise
        except Exception as exc:
            kind = HookRefusal if isinstance(exc, GuardError) else HookError
            raise kind(hook, plugin, exc, rank=int(os.environ.get("RANK", "0"))) from exc

    call._stabguard_named = True
    return call


def _import(module_path: str, near: list[Path]) -> ModuleType:
    """Import ``module_path``; when its top-level package is not on ``sys.path``, look in ``near``."""
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        top = module_path.split(".")[0]
        folders = [str(p.resolve()) for p in near if (p / f"{top}.py").is_file() or (p / top / "__init__.py").is_file()]
        if exc.name != top or not folders:
            raise
    sys.path.extend(f for f in dict.fromkeys(folders) if f not in sys.path)  # its own imports need it later too
    return importlib.import_module(module_path)


def _version_of(plugin: Any) -> str:
    from stabguard import __version__

    module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "")
    if str(module).startswith("stabguard"):
        return __version__
    top = importlib.import_module(str(module).split(".")[0]) if module else None
    return str(getattr(top, "__version__", ""))
