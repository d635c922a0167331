"""TOML recipe -> validated :class:`~stabguard.recipe_schema.Recipe`.

What a recipe is (its sections, every key) lives below, in :mod:`stabguard.recipe_schema`; this module
loads one, and sits above the plugin manager because checking ``[guards.<name>]`` tables means loading the
plugins the recipe names. Every error is collected and reported at once, each as ``dotted.key: message``; the CLI exits 2 on
them. Guard tables (``[guards.<name>]``) are checked against the options model each guard declared
through ``register_guards``, so a recipe is fully checked before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from stabguard import seams
from stabguard.options import GuardOptions
from stabguard.recipe_schema import (  # noqa: F401 - what a recipe is; importable from here as before
    DEEPSPEED_AUTO, DEFAULT_TARGET_MODULES, REMEDIES, TRAINING_ALIASES, TRAINING_DEFAULTS, DataSection,
    LoraSection, ModelSection, QuantizationSection, Recipe, RecoverySection, Section, SnapshotSection,
    SynthOptions, installed_training_name, training_argument_names)
from stabguard.training_types import check_types, toml_repr

# TrainingArguments names that transformers 5 removed or renamed, with what to write instead.
RENAMED_TRAINING_ARGS = {
    "warmup_ratio": "deprecated, then removed in transformers 5: write warmup_steps = {value} (a float in [0, 1) "
                    "is a ratio, on every release)",
    "evaluation_strategy": "renamed in transformers 5: write eval_strategy = {value!r}",
    "no_cuda": "removed in transformers 5: write use_cpu = {value!r}",
    "use_mps_device": "removed in transformers 5: the device is picked automatically; use use_cpu = true to force CPU",
    "logging_dir": "removed in transformers 5: logs go under output_dir",
    "overwrite_output_dir": "removed in transformers 5: delete the output directory yourself",
    "per_gpu_train_batch_size": "renamed: write per_device_train_batch_size = {value!r}",
    "fp16_backend": "removed: write half_precision_backend = {value!r}",
    "save_safetensors": "removed in transformers 5: checkpoints are always safetensors",
    "include_tokens_per_second": "renamed in transformers 5: write include_num_input_tokens_seen = true",
}

class RecipeError(ValueError):
    """Every problem of a recipe, each as ``(dotted key, message)``."""

    def __init__(self, path: str | Path | None, errors: list[tuple[str, str]]):
        self.path = path
        self.errors = errors
        where = f"{path}: " if path else ""
        lines = "\n".join(f"  {key}: {message}" for key, message in errors)
        super().__init__(f"{where}{len(errors)} error(s) in recipe\n{lines}")


def _model_at(model: type[BaseModel] | None, path: tuple) -> type[BaseModel] | None:
    """The pydantic model a nested key belongs to (``data.synth.colour`` -> SynthOptions)."""
    for part in path:
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return None
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return model


def _unknown_key(name: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {hint}allowed: {', '.join(allowed)}"


def _pydantic_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
                     ) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        key = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = _unknown_key(str(err["loc"][-1]), _model_at(model, err["loc"][:-1]))
        elif err["type"] == "literal_error":
            message = f"{err['msg']} (got {toml_repr(err.get('input'))})"
        elif err["type"].endswith("_type"):  # strict mode: "5" for an int
            message = f"{err['msg']}, got {toml_repr(err.get('input'))}"
        out.append((key or "<recipe>", message))
    return out


def _check_sections(raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Validate every section but ``guards`` and ``training``; return the parsed sections."""
    fields = {"plugins": list, "block_plugins": list, "max_consecutive_skips": int, "model": ModelSection,
              "data": DataSection, "lora": LoraSection, "quantization": QuantizationSection,
              "snapshots": SnapshotSection, "recovery": RecoverySection}
    known = set(fields) | {"training", "guards"}
    errors = [(key, f"unknown section; known: {', '.join(sorted(known))}") for key in raw if key not in known]
    parsed: dict[str, Any] = {}
    for name, kind in fields.items():
        value = raw.get(name)
        if value is None:
            if name in ("model", "data"):
                errors.append((name, "missing section"))
            continue
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append((name, f"must be a positive integer (got {value!r})"))
            else:
                parsed[name] = value
            continue
        if kind is list:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                errors.append((name, "must be a list of strings"))
            else:
                parsed[name] = value
            continue
        try:
            parsed[name] = kind.model_validate(value)
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, name, kind))
    return parsed, errors


def check_training(training: Any) -> list[tuple[str, str]]:
    """Names against ``TrainingArguments`` (with the transformers-5 spelling of renamed ones), then values."""
    if not isinstance(training, dict):
        return [("training", "missing section")]
    import transformers
    from transformers import TrainingArguments

    names = training_argument_names()
    errors = []
    for key, value in training.items():
        if key in RENAMED_TRAINING_ARGS:
            errors.append((f"training.{key}", RENAMED_TRAINING_ARGS[key].format(value=value)))
        elif installed_training_name(key, names) not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            errors.append((f"training.{key}", f"not a TrainingArguments field of the installed transformers "
                                              f"{transformers.__version__}{hint}"))
    errors += check_engine(training)
    training = {installed_training_name(k, names): v for k, v in training.items()}
    if "output_dir" not in training:
        errors.append(("training.output_dir", "missing: where checkpoints, trainer_state.json and events.jsonl go"))
    # TrainingArguments keeps a wrongly typed value and the Trainer fails on it mid-run; name it here.
    errors += check_types(training)
    if errors:
        return errors
    # Values are checked here, not this machine: TrainingArguments refuses bf16 without a bf16 GPU unless
    # use_cpu is set, which would fail a GPU recipe validated on a laptop. The run itself still checks.
    device_free = {"use_cpu": True} if training.get("bf16") or training.get("bf16_full_eval") else {}
    try:
        # A deep copy: TrainingArguments fills in dict values (fsdp_config) in place.
        TrainingArguments(**copy.deepcopy({**TRAINING_DEFAULTS, **training, **device_free}))
    except (ValueError, TypeError) as exc:
        errors.append(("training", str(exc).strip().splitlines()[0]))
    return errors


def check_engine(training: dict[str, Any]) -> list[tuple[str, str]]:
    """The engines GuardTrainer runs: single device, DDP, FSDP2 (``fsdp`` + ``fsdp_config.version = 2``) and
    DeepSpeed ZeRO-1/2/3 (``deepspeed``: an inline table or a JSON file)."""
    from stabguard.engine_check import FSDP1_REFUSED, engine_spec, read_deepspeed_config

    errors = []
    if training.get("deepspeed"):
        try:
            zero = read_deepspeed_config(training["deepspeed"]).get("zero_optimization", {})
        except ValueError as exc:
            errors.append(("training.deepspeed", str(exc)))
        else:
            if zero.get("stage", 0) not in (1, 2, 3):
                errors.append(("training.deepspeed.zero_optimization.stage",
                               f"{zero.get('stage', 0)!r}: stabguard guards ZeRO stages 1, 2 and 3 (it vetoes "
                               f"through the ZeRO optimizer); for no ZeRO use DDP (drop training.deepspeed)"))
            if zero.get("compute_grad_norm") is False:
                errors.append(("training.deepspeed.zero_optimization.compute_grad_norm",
                               "false: the guards clip through DeepSpeed's norm; remove it"))
        if training.get("fsdp"):
            errors.append(("training.fsdp", "FSDP and DeepSpeed together: choose one"))
    spec = engine_spec(training)
    if spec.fsdp_version not in (None, 2):
        errors.append(("training.fsdp_config.version", FSDP1_REFUSED))
    elif spec.kind == "fsdp2" and (problem := seams.fsdp2_accelerate_problem()):
        errors.append(("training.fsdp", problem))
    return errors


def training_args_view(recipe) -> Any:
    """TrainingArguments' values without building one (that checks the device: a bf16 recipe is fine here)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)
                if f.default is not dataclasses.MISSING}
    return SimpleNamespace(**{**defaults, **recipe.training_arguments()})


def check_guards(raw_guards: Any, known: dict[str, type[GuardOptions]],
                 off_unless_named: set[str] = frozenset()) -> tuple[dict, list[tuple[str, str]]]:
    """Each ``[guards.<name>]`` table against the options its guard declared; absent guards get defaults
    (``enabled = false`` for those in ``off_unless_named``: third-party guards from entry points)."""
    raw_guards = raw_guards or {}
    if not isinstance(raw_guards, dict):
        return {}, [("guards", "must be a table of [guards.<name>] tables")]
    errors: list[tuple[str, str]] = []
    for name in raw_guards:
        if name not in known:
            errors.append((f"guards.{name}", f"unknown guard; known guards: {', '.join(sorted(known)) or 'none'}"))
    options = {}
    for name, model in known.items():
        table = raw_guards.get(name, {"enabled": False} if name in off_unless_named else {})
        if not isinstance(table, dict):
            errors.append((f"guards.{name}", "must be a table"))
            continue
        try:
            options[name] = model.model_validate(table)
        except ValidationError as exc:
            errors.extend(_pydantic_errors(exc, f"guards.{name}", model))
    return options, errors


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(path, [("<file>", f"recipe not found: {path}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(path, [("<toml>", str(exc))]) from None


def plugin_lists(path: str | Path) -> tuple[list[str], list[str]]:
    """The recipe's ``plugins`` and ``block_plugins`` (unchecked; ``load_recipe`` reports bad values)."""
    raw = read_toml(path)
    lists = [raw.get(key, []) for key in ("plugins", "block_plugins")]
    return tuple([v for v in value if isinstance(v, str)] if isinstance(value, list) else [] for value in lists)


def load_recipe(path: str | Path, plugins=None) -> Recipe:
    """Read and validate a recipe; raise :class:`RecipeError` listing every problem.

    :param plugins: a :class:`~stabguard.manager.Plugins` whose guards the ``[guards.*]`` tables are
        checked against; built from the recipe's own ``plugins``/``block_plugins`` when None.
    """
    raw = read_toml(path)
    parsed, errors = _check_sections(raw)
    errors += check_training(raw.get("training"))
    if plugins is None:
        from stabguard.manager import Plugins

        try:
            plugins = Plugins.for_recipe(parsed.get("plugins", []), parsed.get("block_plugins", []),
                                         near=[Path(path).parent])
        except ImportError as exc:
            errors.append(("plugins", str(exc)))
    guards = {}
    if plugins is not None:  # with a plugin that failed to import, guard tables cannot be checked
        guards, guard_errors = check_guards(raw.get("guards"), plugins.guard_options(), plugins.off_unless_named())
        errors += guard_errors
    if errors:
        raise RecipeError(path, errors)
    return Recipe(path=Path(path), training=raw["training"], guards=guards, **parsed)
