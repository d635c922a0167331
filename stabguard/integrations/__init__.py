"""stabguard inside the frameworks people already train with: Axolotl, ms-swift, LLaMA-Factory.

Each framework module connects that framework's own extension point to two shared pieces, so the guarded
step runs exactly as under ``stabguard run``:

- :class:`GuardSettings`: which guards, with which options, and which plugin modules; the same tables a
  recipe holds (``plugins = [...]``, ``[guards.<name>]``, ``[snapshots]``, ``[recovery]``), given inline or as the path
  of a recipe (or of a TOML file holding only those tables). Checked before any model is loaded.
- :func:`guarded_trainer`: the framework's own trainer class with the guarded step and the settings bound,
  so that the framework builds it with its own arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["GuardSettings", "RunStopped", "guarded_trainer", "settings_from_env"]

RECIPE_ENV, GUARDS_ENV, PLUGINS_ENV = "STABGUARD_RECIPE", "STABGUARD_GUARDS", "STABGUARD_PLUGINS"
PROBE_ENV = "STABGUARD_PROBE"


class GuardSettings(BaseModel):
    """What a framework run guards. ``recipe``: a TOML file whose ``plugins``, ``[guards.*]``,
    ``[snapshots]``, ``[recovery]`` and ``max_consecutive_skips`` are used (its other sections are ignored); the keys given
    here win over it. No guards named anywhere: mask, grad_norm, nonfinite and spike, with their defaults."""

    model_config = ConfigDict(extra="forbid")

    recipe: Path | None = None
    guards: dict[str, dict[str, Any]] | None = None
    plugins: list[str] = Field(default_factory=list)
    max_consecutive_skips: int = Field(default=20, ge=1)
    snapshot_every: int = Field(default=1, ge=0)
    snapshot_offload: bool = False
    snapshot_ring: int = Field(default=2, ge=0)  # [snapshots] ring: earlier verified snapshots a rewind goes to
    snapshot_ring_every: int = Field(default=20, ge=1)  # [snapshots] ring_every
    recovery: dict[str, Any] | None = None  # the [recovery] table; None: its defaults
    probe: bool = False  # run the first step with its update vetoed, print the probe's report, exit

    @model_validator(mode="after")
    def _merge_recipe_and_check(self) -> GuardSettings:
        if self.recipe is not None:
            self._merge(self.recipe)
        self.make_plugins()  # unknown guards, bad options, missing modules: refused now, by key
        self.recovery_section()
        return self

    def recovery_section(self):
        """The ``[recovery]`` table, validated; errors name their key (``stabguard.recovery.<key>``)."""
        from pydantic import ValidationError

        from stabguard.recipe import RecoverySection

        try:
            return RecoverySection(**(self.recovery or {}))
        except ValidationError as exc:
            raise ValueError("; ".join(f"stabguard.recovery.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                       for e in exc.errors())) from None

    def _merge(self, path: Path) -> None:
        from stabguard.recipe import read_toml

        raw, given = read_toml(path), self.model_fields_set
        snapshots = raw.get("snapshots") or {}
        if "guards" not in given and isinstance(raw.get("guards"), dict):
            self.guards = raw["guards"]
        if "plugins" not in given:
            self.plugins = list(raw.get("plugins") or [])
        if "max_consecutive_skips" not in given:
            self.max_consecutive_skips = raw.get("max_consecutive_skips", self.max_consecutive_skips)
        if "snapshot_every" not in given:
            self.snapshot_every = snapshots.get("every", self.snapshot_every)
        if "snapshot_offload" not in given:
            self.snapshot_offload = snapshots.get("offload", self.snapshot_offload)
        if "snapshot_ring" not in given:
            self.snapshot_ring = snapshots.get("ring", self.snapshot_ring)
        if "snapshot_ring_every" not in given:
            self.snapshot_ring_every = snapshots.get("ring_every", self.snapshot_ring_every)
        if "recovery" not in given and isinstance(raw.get("recovery"), dict):
            self.recovery = raw["recovery"]

    def make_plugins(self):
        """A fresh plugin manager with these guards enabled (each trainer gets its own)."""
        from stabguard.trainer import plugins_for

        return plugins_for(self.guards, modules=self.plugins, where="stabguard")

    def step_kwargs(self) -> dict[str, Any]:
        return {"max_consecutive_skips": self.max_consecutive_skips, "snapshot_every": self.snapshot_every,
                "snapshot_offload": self.snapshot_offload, "snapshot_ring": self.snapshot_ring,
                "snapshot_ring_every": self.snapshot_ring_every, "recovery": self.recovery_section()}


def settings_from_env(environ=None) -> GuardSettings:
    """Settings for a framework whose command line has no place for them: ``STABGUARD_RECIPE`` (a TOML
    file's tables), ``STABGUARD_GUARDS`` (a JSON object ``{guard: {option: value}}``) and
    ``STABGUARD_PLUGINS`` (plugin modules, comma-separated); none set: the default guards.
    ``STABGUARD_PROBE=1``: the probe instead of training (:mod:`stabguard.integrations.probe`)."""
    import json
    import os

    environ = os.environ if environ is None else environ
    given: dict[str, Any] = {}
    if environ.get(RECIPE_ENV):
        given["recipe"] = environ[RECIPE_ENV]
    if environ.get(GUARDS_ENV):
        try:
            given["guards"] = json.loads(environ[GUARDS_ENV])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{GUARDS_ENV}: not JSON ({exc}): {environ[GUARDS_ENV]!r}") from None
    if environ.get(PLUGINS_ENV):
        given["plugins"] = [m.strip() for m in environ[PLUGINS_ENV].split(",") if m.strip()]
    if environ.get(PROBE_ENV, "").strip().lower() in ("1", "true", "yes"):
        given["probe"] = True
    return GuardSettings.model_validate(given)


class RunStopped(SystemExit):
    """A guard stopped the run inside a framework: its CLI exits 3 (as ``stabguard run`` does), not 0."""

    def __init__(self, trainer):
        from stabguard.cli.run import EXIT_STOPPED

        print(f"stabguard: STOPPED at {trainer.stop_reason}; the last verified state is in the newest checkpoint "
              f"of {trainer.args.output_dir}; decisions in its events.jsonl", flush=True)
        super().__init__(EXIT_STOPPED)


def guarded_trainer(base: type, settings: GuardSettings, *, processor=None) -> type:
    """``base`` (a ``transformers.Trainer`` subclass) with the guarded step and ``settings`` bound.

    :param processor: ``processor(trainer)`` -> the processor the data guards read labels with, for
        frameworks that pass only the tokenizer as ``processing_class``.
    """
    from stabguard.integrations import probe
    from stabguard.trainer import guarded

    parent = guarded(base)

    def __init__(self, *args, **kwargs):
        plugins, self.probe_recorder = settings.make_plugins(), None
        if settings.probe:
            self.probe_recorder = probe.start(plugins, args, kwargs)
        parent.__init__(self, *args, plugins=plugins, setup_guards=True, **settings.step_kwargs(), **kwargs)
        if settings.probe:
            probe.restrict(self)

    def processor_for_guards(self):
        found = processor(self) if processor is not None else None
        return found if found is not None else parent.processor_for_guards(self)

    def train(self, *args, **kwargs):
        out = parent.train(self, *args, **kwargs)
        if self.probe_recorder is not None:
            probe.finish(self, self.probe_recorder, base.__name__)
        if self.stop_reason is not None:
            raise RunStopped(self)
        return out

    return type(f"Stabguard{base.__name__}", (parent,), {
        "__init__": __init__, "processor_for_guards": processor_for_guards, "train": train,
        "__module__": __name__, "__doc__": f"{base.__name__} with stabguard's guarded step."})
