"""Model and processor loading: real Qwen3-VL checkpoints, 4-bit, LoRA, and tiny random models for CPU.

Everything here works offline. A tiny random Qwen3-VL (a few hundred thousand parameters) is built
locally with the demo tokenizer and a locally assembled processor (both from ``stabguard.qwen``), saved
like a real checkpoint, and loaded back through ``from_pretrained`` -- so the demo and the 32B run share
one path.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen3VLConfig

from stabguard.qwen import build_demo_tokenizer, build_processor, build_qwen_tokenizer

# Still importable from here, as before stabguard.qwen took them over.
from stabguard.qwen import (  # noqa: F401
    QWEN3VL_CHAT_TEMPLATE, QWEN3VL_MAX_PIXELS, QWEN3VL_MIN_PIXELS, QWEN_ADDED_TOKENS, QWEN_FIRST_ADDED_ID,
    QWEN_SPLIT_PATTERN, build_qwen_tokenizer,
)

# Tiny-model defaults when none are given: 4 to 64 tokens per image keeps CPU steps fast.
TINY_MIN_PIXELS = 4 * 32 * 32
TINY_MAX_PIXELS = 64 * 32 * 32


@contextlib.contextmanager
def peft_quietly():
    """PEFT (0.18) asks transformers 5 for the deprecated ``is_gradient_checkpointing`` each time it wraps
    a model; the FutureWarning is theirs to fix, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen3-VL's 24:20:20 proportion."""
    half = head_dim // 2
    hw = round(half * 20 / 64)
    return [half - 2 * hw, hw, hw]


def _tiny_text_config(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 8192, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.pad_token_id,
    }


def _tiny_vision_config() -> dict[str, Any]:
    return {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 256,
        "deepstack_visual_indexes": [1],
    }


def _unknown_keys(where: str, keys: Any, config_cls: type, extra: set[str]) -> list[str]:
    """Keys a config class would silently keep as stray attributes; each named by its recipe key."""
    fields = getattr(config_cls, "__dataclass_fields__", None)
    if fields is None:  # a transformers release without dataclass configs: nothing to check against
        return []
    return [f"{where}{k}" for k in keys if k not in fields and k not in extra]


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Nested text_config/vision_config dicts go to the sub-configs, other keys to Qwen3VLConfig;
    a typo fails here, naming the key, instead of being kept as an attribute nothing reads."""
    from transformers import Qwen3VLTextConfig, Qwen3VLVisionConfig

    top = dict(overrides)
    text = dict(top.pop("text_config", None) or {})
    vision = dict(top.pop("vision_config", None) or {})
    unknown = (
        _unknown_keys("model.tiny.text_config.", text, Qwen3VLTextConfig, {"eos_token_id", "bos_token_id"})
        + _unknown_keys("model.tiny.vision_config.", vision, Qwen3VLVisionConfig, set())
        + _unknown_keys("model.tiny.", top, Qwen3VLConfig, set())
    )
    if unknown:
        raise ValueError(
            "unknown tiny-model override(s): " + ", ".join(unknown) + "; text keys go under "
            "text_config and vision keys under vision_config, e.g. tiny = {text_config = {hidden_size = 32}}"
        )
    return text, vision, top


def tiny_config(tokenizer: Any, **overrides: Any) -> Qwen3VLConfig:
    """A tiny random Qwen3-VL shape (text 64x2 layers, vision 32x2 blocks) sized to `tokenizer`.

    `overrides`: {"text_config": {...}, "vision_config": {...}} and/or top-level Qwen3VLConfig keys.
    The vision output width follows the text hidden size, and the M-RoPE split follows head_dim,
    unless they are overridden themselves.
    """
    text_over, vision_over, top = _split_overrides(overrides)
    text = {**_tiny_text_config(tokenizer), **text_over}
    text.setdefault("rope_parameters", {
        "rope_type": "default", "rope_theta": 5_000_000.0,
        "mrope_section": _mrope_section(text["head_dim"]), "mrope_interleaved": True,
    })
    vision = {**_tiny_vision_config(), "out_hidden_size": text["hidden_size"], **vision_over}
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **{**ids, **top})


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, overrides: dict[str, Any] | None = None,
    min_pixels: int | None = None, max_pixels: int | None = None, tokenizer: str = "demo",
) -> Path:
    """Build a tiny random Qwen3-VL (float32, deterministic by `seed`) with a local processor, and save
    both into `out_dir` like a real checkpoint, so the rest of stabguard loads it through
    `from_pretrained` exactly as it loads Qwen/Qwen3-VL-32B-Instruct.

    `tokenizer`: "demo" (a 2048-token BPE: small and fast) or "qwen" (the real Qwen vocabulary with every
    special token at its real id, from the `dashscope` package; for code that hard-codes Qwen's ids, as
    some training frameworks do)."""
    from transformers import Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_qwen_tokenizer() if tokenizer == "qwen" else build_demo_tokenizer()
    processor = build_processor(
        tokenizer, min_pixels=min_pixels or TINY_MIN_PIXELS, max_pixels=max_pixels or TINY_MAX_PIXELS
    )
    config = tiny_config(tokenizer, **(overrides or {}))
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"stabguard: built tiny random Qwen3-VL ({n_params / 1e6:.2f}M params, seed {seed}) in {out}",
          file=sys.stderr, flush=True)
    return out


def resolve_model_class(name: str) -> type:
    """The transformers class called `name`; a clear error for names a release removed or never had."""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    is_model = isinstance(cls, type) and (
        issubclass(cls, transformers.PreTrainedModel) or hasattr(cls, "_model_mapping")  # Auto* classes
    )
    if not is_model:
        removed = name == "AutoModelForVision2Seq"
        hint = " (AutoModelForVision2Seq was removed in transformers 5)" if removed else ""
        raise ValueError(
            f"model.model_class: {name!r} is not a model class in transformers {transformers.__version__}"
            f"{hint}; use 'Qwen3VLForConditionalGeneration' or 'AutoModelForImageTextToText'"
        )
    return cls


def _torch_dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key}: {name!r} is not a torch dtype; use bfloat16, float16 or float32")
    return dtype


def resolve_dtype(name: str) -> torch.dtype | str:
    """Map the recipe's model.dtype to what from_pretrained takes.

    `auto` keeps the checkpoint's dtype on GPU but loads float32 on CPU: bf16 matmuls on a 2-core CPU
    are several times slower than fp32, and fp16 on CPU is slower still.
    """
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return _torch_dtype(name, "model.dtype")


def ensure_model(model: Any) -> str:
    """Build the tiny random model at name_or_path first when the recipe asks for one (model.tiny)
    and no checkpoint is there yet; `seed` inside model.tiny picks the weights (default 0)."""
    tiny = getattr(model, "tiny", None)
    if tiny is not None and not (Path(model.name_or_path) / "config.json").is_file():
        overrides = dict(tiny)
        seed = overrides.pop("seed", 0)
        build_tiny_model(
            model.name_or_path, seed=seed, overrides=overrides,
            min_pixels=getattr(model, "min_pixels", None), max_pixels=getattr(model, "max_pixels", None),
        )
    return model.name_or_path


def _bnb_config(quantization: Any) -> Any:
    """4-bit config; skip_modules REPLACES transformers' default list, so it must name lm_head too."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(quantization.compute_dtype, "quantization.compute_dtype"),
        llm_int8_skip_modules=list(quantization.skip_modules),
        # getattr: callers may pass any object with the section's older fields (tests, scripts).
        bnb_4bit_quant_storage=_torch_dtype(getattr(quantization, "quant_storage", "uint8"), "quantization.quant_storage"),
    )


def _load_kwargs(model: Any, quantization: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(model.dtype)}
    if getattr(model, "attn_implementation", None):
        kwargs["attn_implementation"] = model.attn_implementation
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(quantization)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return kwargs


def lora_config(lora: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, bias=lora.bias, task_type="CAUSAL_LM",
    )


def load_processor(model: Any) -> Any:
    """AutoProcessor from name_or_path, with the recipe's pixel limits when it sets them.

    The limits are set on the image processor after loading: passed to from_pretrained they would also
    ride along on every call, which transformers 5 warns is deprecated.
    """
    from transformers import AutoProcessor
    from transformers.image_utils import SizeDict

    processor = AutoProcessor.from_pretrained(model.name_or_path)
    size = processor.image_processor.size
    min_pixels, max_pixels = getattr(model, "min_pixels", None), getattr(model, "max_pixels", None)
    processor.image_processor.size = SizeDict(
        shortest_edge=min_pixels or size.shortest_edge, longest_edge=max_pixels or size.longest_edge
    )
    return processor


def load_model(model: Any, lora: Any, quantization: Any) -> tuple[Any, Any]:
    """Load (model, processor) from the recipe's model/lora/quantization sections (duck-typed).

    Order matters: quantize while loading, then prepare_model_for_kbit_training (casts norms and
    embeddings to fp32), then wrap with LoRA. Gradient checkpointing is left to the training args.
    dtype "auto" gives float32 on CPU (bf16 training on a 2-core CPU is several times slower).
    """
    cls = resolve_model_class(getattr(model, "model_class", "Qwen3VLForConditionalGeneration"))
    path = ensure_model(model)
    net = cls.from_pretrained(path, **_load_kwargs(model, quantization))
    if quantization is not None and quantization.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        with peft_quietly():
            net = get_peft_model(net, lora_config(lora))
    return net, load_processor(model)
