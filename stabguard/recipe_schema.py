"""What a recipe is: its sections as pydantic models, each key with its type, default and limits.

Below the hookspecs (``configure(recipe)`` names :class:`Recipe`) and the step (``[recovery]``), and above
nothing that loads plugins: :mod:`stabguard.recipe` reads a TOML file into these models and checks the
guard tables against the plugins the recipe names. The docs' recipe reference is generated from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stabguard.options import GuardOptions

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

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
    """``[model]``: which checkpoint, as which class, in which dtype."""

    name_or_path: str = Field(description="a local folder or a Hugging Face hub id")
    model_class: str = Field(default="Qwen3VLForConditionalGeneration",
                             description="the transformers class to load (checked against config.architectures)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="the weights' dtype; auto: the checkpoint's")
    attn_implementation: str | None = Field(default="sdpa", description="passed to from_pretrained")
    tiny: dict[str, Any] | None = Field(default=None, description="build a tiny random Qwen3-VL at name_or_path "
                                        "first (text_config, vision_config, seed): the CPU demo's model")
    min_pixels: int | None = Field(default=None, gt=0, description="the image processor's smallest image, in pixels")
    max_pixels: int | None = Field(default=None, gt=0, description="the image processor's largest image, in pixels")


class LoraSection(Section):
    """``[lora]``: the PEFT adapters (peft's ``LoraConfig``)."""

    enabled: bool = Field(default=True, description="false: train the model's own weights")
    r: int = Field(default=16, gt=0, description="adapter rank")
    alpha: int = Field(default=32, gt=0, description="scaling numerator (lora_alpha)")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                            description="module names (or a regex) that get adapters")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="which biases train")


class QuantizationSection(Section):
    """``[quantization]``: 4-bit weights through bitsandbytes (QLoRA)."""

    load_in_4bit: bool = Field(default=False, description="load the weights in 4 bits")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="the 4-bit data type")
    double_quant: bool = Field(default=True, description="quantize the quantization constants too")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="dtype of the matmuls on dequantized weights")
    # How the 4-bit values are packed. FSDP needs a float storage equal to the model's dtype (uint8
    # storage trains with loss 0 / grad_norm nan under FSDP2, accelerate#3983).
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        default="uint8", description="how the 4-bit values are stored; FSDP2 needs the model's dtype "
        "(uint8 trains with loss 0 / grad_norm nan, accelerate#3983)")
    skip_modules: list[str] = Field(default_factory=lambda: ["model.visual", "lm_head"],
                                    description="modules left unquantized; replaces transformers' list, "
                                    "so name lm_head too")


class SynthOptions(Section):
    """Arguments of ``stabguard.data.synth.synth_pcb``."""

    n: int = Field(default=64, ge=1, description="boards")
    seed: int = Field(default=0, description="each board is seeded from (seed, board index)")
    size: int = Field(default=256, ge=64, description="image side, pixels")
    val_fraction: float = Field(default=0.25, ge=0, lt=1, description="share of boards in the val split")


class DataSection(Section):
    """``[data]``: JSONL conversations with images relative to the file."""

    train: str = Field(description="the training JSONL file")
    val: str | None = Field(default=None, description="the validation JSONL file (stabguard eval)")
    max_length: int | None = Field(default=2048, gt=0, description="tokens per sample; longer ones are cut")
    truncation: Literal["drop", "error"] = Field(
        default="drop", description="a sample whose cut would leave no supervised token: drop it (an event) or fail")
    padding_side: Literal["right", "left"] = Field(default="right", description="where the collator pads")
    synth: SynthOptions | None = Field(default=None, description="generate synthetic PCB boards when train does "
                                       "not exist ([data.synth])")
    bad_rows: Literal["error", "skip"] = Field(
        default="error", description="skip: leave bad rows/images out, each one an event")
    # ZeRO-3 and FSDP fail or hang when ranks mix image and text-only batches.
    text_only_image: bool = Field(default=False, description="a small blank image before the first user text of "
                                  "every text-only sample, so every rank runs the vision tower at every step")


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
    """A validated recipe: its top-level keys. ``training`` holds the keyword arguments for ``TrainingArguments``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: Path | None = Field(default=None, description="the file it was read from (set by load_recipe, not a key)")
    plugins: list[str] = Field(default_factory=list, description="your guard modules: importable, or beside "
                               "the recipe or in the current folder")
    block_plugins: list[str] = Field(default_factory=list, description="plugins (built-in or not) kept from loading")
    max_consecutive_skips: int = Field(default=20, description="skips in a row, asked by any guard, before the "
                                       "core stops the run")
    model: ModelSection
    data: DataSection
    training: dict[str, Any] = Field(description="keyword arguments of transformers.TrainingArguments, checked "
                                     "against the types it declares")
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    snapshots: SnapshotSection = Field(default_factory=SnapshotSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)
    guards: dict[str, GuardOptions] = Field(default_factory=dict, description="one [guards.<name>] table per "
                                            "guard: its options (below)")

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
