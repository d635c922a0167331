"""TOML recipe -> validated :class:`Recipe`.

Every error is collected and reported at once, each as ``dotted.key: message``; the CLI exits 2 on
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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stabguard import seams
from stabguard.options import GuardOptions
from stabguard.training_types import check_types, toml_repr

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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

# One setting under two names across the supported transformers releases (5.24 renamed it): a recipe may
# write either, and the run passes it under the name the installed release knows.
TRAINING_ALIASES = {"activation_checkpointing": "gradient_checkpointing",
                    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}
TRAINING_ALIASES |= {new: old for old, new in TRAINING_ALIASES.items()}


def installed_training_name(key: str, names: set[str]) -> str:
    """``key`` as the installed ``TrainingArguments`` spells it (the same key when it knows it, or none)."""
    if key in names or TRAINING_ALIASES.get(key) not in names:
        return key
    return TRAINING_ALIASES[key]


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


# Set by stabguard unless the recipe says otherwise; see the docs for why each one.
TRAINING_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,  # samples carry messages/images the collator needs
    "logging_nan_inf_filter": False,  # a host sync per micro-step that hides NaN; nonfinite replaces it
    "report_to": "none",
    "save_strategy": "steps",
    "dataloader_num_workers": 0,
}


class Section(BaseModel):
    # strict: "16" is not taken as 16 (an int is still taken as a float)
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSection(Section):
    name_or_path: str
    model_class: str = "Qwen3VLForConditionalGeneration"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str | None = "sdpa"
    tiny: dict[str, Any] | None = None
    min_pixels: int | None = Field(default=None, gt=0)
    max_pixels: int | None = Field(default=None, gt=0)


class LoraSection(Section):
    enabled: bool = True
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationSection(Section):
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # How the 4-bit values are packed. FSDP needs a float storage equal to the model's dtype (uint8
    # storage trains with loss 0 / grad_norm nan under FSDP2, accelerate#3983).
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    skip_modules: list[str] = Field(default_factory=lambda: ["model.visual", "lm_head"])


class SynthOptions(Section):
    """Arguments of ``stabguard.data.synth.synth_pcb``."""

    n: int = Field(default=64, ge=1)
    seed: int = 0
    size: int = Field(default=256, ge=64)
    val_fraction: float = Field(default=0.25, ge=0, lt=1)


class DataSection(Section):
    train: str
    val: str | None = None
    max_length: int | None = Field(default=2048, gt=0)
    truncation: Literal["drop", "error"] = "drop"
    padding_side: Literal["right", "left"] = "right"
    synth: SynthOptions | None = None  # generate synthetic PCB boards when `train` does not exist
    bad_rows: Literal["error", "skip"] = "error"  # skip: leave bad rows/images out, each one an event
    # A small blank image before the first user text of every text-only sample, so every rank runs the
    # vision tower at every step: ZeRO-3 and FSDP fail or hang when ranks mix image and text-only batches.
    text_only_image: bool = False


class SnapshotSection(Section):
    """The core's verified snapshot: what a ROLLBACK restores and a STOP saves; and a ring of earlier ones
    that a rewind (a divergence) goes back to."""

    every: int = Field(default=1, ge=0, description="optimizer steps between snapshots; 0: none (a STOP "
                       "then saves the current, unverified state and rollbacks act as skips)")
    offload: bool = Field(default=False, description="keep the snapshots in CPU memory, not on the device")
    ring: int = Field(default=2, ge=0, description="earlier verified snapshots kept besides the last (the one "
                      "with the lowest loss always among them); 0: none, a divergence cannot be rewound")
    ring_every: int = Field(default=20, ge=1, description="optimizer steps between the ring's snapshots")


REMEDIES = ("quarantine", "cool_down", "reset_moments", "rewind", "tighten_clip")


class RecoverySection(Section):
    """``[recovery]`` in a recipe (every key optional). Each remedy is chosen by the evidence of a replay of
    the rejected step (stabguard/replay.py); ``remedies`` lists those the run may use."""

    enabled: bool = Field(default=True, description="diagnose rejected steps and heal before stopping; false: a "
                          "healable STOP stops, nothing is replayed")
    remedies: list[str] = Field(default_factory=lambda: list(REMEDIES),
                                description="the remedies the evidence may choose from")
    budget: int = Field(default=3, ge=0, description="remedies within budget_window steps; then a STOP stops")
    budget_window: int = Field(default=500, ge=1, description="steps over which remedies are counted")
    evidence_factor: float = Field(default=3.0, gt=1, description="a replayed sample is high when its loss is "
                                   "above this times the reference (the best verified state's loss)")
    burst_steps: int = Field(default=10, ge=1, description="a rejected step within this many steps of the last "
                             "one is part of a burst: the trajectory, not a one-off")
    lr_cut: float = Field(default=10.0, gt=1, description="a cool-down brings the learning rate this many times "
                          "below the rate in force where the loss first went high")
    cool_steps: int = Field(default=0, ge=0, description="steps a cool-down lasts; 0: the rest of the run")
    moments_share: float = Field(default=0.5, gt=0, le=1, description="share of the grad norm one module must "
                                 "hold for reset_moments to reset its Adam moments")
    clip_factor: float = Field(default=0.5, gt=0, lt=1, description="factor that tightens the clip")
    clip_start: float = Field(default=1.0, gt=0, description="the clip a run without max_grad_norm gets first")
    replay_tolerance: float = Field(default=1e-3, ge=0, description="relative difference between a step's loss "
                                    "and its replay (same weights, inputs, RNG) that names the hardware")

    @field_validator("remedies")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in REMEDIES]
        if unknown:
            raise ValueError(f"unknown remedy {unknown[0]!r}; known: {', '.join(REMEDIES)}")
        return value


class Recipe(BaseModel):
    """A validated recipe. ``training`` holds the keyword arguments for ``TrainingArguments``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: Path | None = None
    plugins: list[str] = Field(default_factory=list)
    block_plugins: list[str] = Field(default_factory=list)
    max_consecutive_skips: int = 20  # skips in a row, asked by any guard, before the core stops the run
    model: ModelSection
    data: DataSection
    training: dict[str, Any]
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    snapshots: SnapshotSection = Field(default_factory=SnapshotSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)
    guards: dict[str, GuardOptions] = Field(default_factory=dict)

    def training_arguments(self) -> dict[str, Any]:
        """The keyword arguments for ``TrainingArguments``: stabguard's defaults, then the recipe. An inline
        ``[training.deepspeed]`` table gets ``"auto"`` (filled from the training arguments) for the batch,
        accumulation, clipping and bf16 keys it leaves out; DeepSpeed refuses a config without them."""
        names = training_argument_names()
        args = {**TRAINING_DEFAULTS, **{installed_training_name(k, names): v for k, v in self.training.items()}}
        if isinstance(args.get("deepspeed"), dict):
            args["deepspeed"] = {**DEEPSPEED_AUTO, **args["deepspeed"]}
        return args


DEEPSPEED_AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}


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
