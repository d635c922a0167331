"""The GPU memory one rank of a recipe's run needs, estimated from the configuration, arithmetic shown.

``stabguard check`` reports it before any GPU time is spent. The weight counts come from the model
built as a skeleton on the ``meta`` device; for a hub id that is not a local folder, the known Qwen3-VL
sizes below stand in for its config, so nothing is downloaded.
"""

from __future__ import annotations

import re

import torch

from stabguard.recipe import training_args_view

GiB = 2**30
# Qwen3-VL releases (qwen3vl.md): text hidden/layers/heads/kv heads/FFN/tied, vision depth/hidden/FFN/deepstack.
KNOWN_QWEN3VL = {
    "2B": (2048, 28, 16, 8, 6144, True, 24, 1024, 4096, [5, 11, 17]),
    "4B": (2560, 36, 32, 8, 9728, True, 24, 1024, 4096, [5, 11, 17]),
    "8B": (4096, 36, 32, 8, 12288, False, 27, 1152, 4304, [8, 16, 24]),
    "32B": (5120, 64, 64, 8, 25600, False, 27, 1152, 4304, [8, 16, 24]),
}


def known_config(name: str):
    """A Qwen3VLConfig for a known release named in ``name`` (Qwen/Qwen3-VL-32B-Instruct ...), else None."""
    match = re.search(r"qwen3-vl-(\d+)b(?!-a)", name, re.IGNORECASE)
    if not match or f"{match.group(1)}B" not in KNOWN_QWEN3VL:
        return None
    from transformers import Qwen3VLConfig

    h, layers, heads, kv, ffn, tied, depth, v_h, v_ffn, deepstack = KNOWN_QWEN3VL[f"{match.group(1)}B"]
    text = dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=ffn, vocab_size=151936, head_dim=128)
    vision = dict(depth=depth, hidden_size=v_h, intermediate_size=v_ffn, num_heads=16, out_hidden_size=h,
                  deepstack_visual_indexes=deepstack, num_position_embeddings=2304)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    config.architectures, config.dtype = ["Qwen3VLForConditionalGeneration"], "bfloat16"
    return config


def under(name: str, prefixes) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (as bitsandbytes' skip_modules match)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def weight_counts(model, quantization) -> dict[str, int]:
    """Parameters bitsandbytes would quantize (Linear weights outside skip_modules) and the rest."""
    total = sum(p.numel() for p in model.parameters())
    if not quantization.load_in_4bit:
        return {"quantized": 0, "other": total}
    skip = quantization.skip_modules
    quantized = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not under(n, skip))
    return {"quantized": quantized, "other": total - quantized}


def trainable_counts(model) -> dict[str, int]:
    counts = {"lora": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts["lora" if ".lora_" in name else "other"] += p.numel()
    return counts


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_dtype(recipe, config) -> str:
    """The dtype weights load in on a GPU: the recipe's, or for "auto" the checkpoint's own."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    saved = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    return saved if saved in DTYPE_BYTES else "float32"


class Arithmetic(list):
    """Lines of a memory estimate, each with its arithmetic written out."""

    def add(self, what: str, arithmetic: str, n_bytes: float) -> None:
        self.append({"what": what, "arithmetic": arithmetic, "gib": round(n_bytes / GiB, 3)})


def weight_lines(out: Arithmetic, q, weights: dict[str, int], wd: str) -> None:
    if not q.load_in_4bit:
        out.add(f"weights ({wd})", f"{weights['other']:,} x {DTYPE_BYTES[wd]} B", weights["other"] * DTYPE_BYTES[wd])
        return
    bits = 4.127 if q.double_quant else 4.5  # 4 bits + absmax per 64 (fp32, or 8-bit + fp32 per 256 blocks)
    out.add(f"4-bit {q.quant_type} weights", f"{weights['quantized']:,} x {bits} bits / 8", weights["quantized"] * bits / 8)
    out.add("unquantized weights, fp32 after prepare_model_for_kbit_training", f"{weights['other']:,} x 4 B",
            weights["other"] * 4)


def trainable_lines(out: Arithmetic, trainable: dict[str, int], wb: int, eight_bit: bool) -> None:
    """LoRA adapters are fp32 (peft upcasts them); AdamW keeps two states per parameter, 8-bit Adam 1 byte each."""
    if trainable["lora"]:
        sb = 2 if eight_bit else 8
        out.add("LoRA adapters (fp32): weight + grad + optimizer state", f"{trainable['lora']:,} x (4 + 4 + {sb}) B",
                trainable["lora"] * (8 + sb))
    if trainable["other"]:
        sb = 2 if eight_bit else 2 * wb
        out.add("trainable base weights: grad + optimizer state", f"{trainable['other']:,} x ({wb} + {sb}) B",
                trainable["other"] * (wb + sb))


def snapshot_lines(out: Arithmetic, trainable: dict[str, int], wb: int, eight_bit: bool, snapshots) -> None:
    """The core's verified snapshot: a copy of the trainable weights and their optimizer state, on the GPU
    unless offloaded to CPU memory."""
    if not snapshots.every or not (trainable["lora"] or trainable["other"]):
        return
    lora = trainable["lora"] * (4 + (2 if eight_bit else 8))
    other = trainable["other"] * (wb + (2 if eight_bit else 2 * wb))
    copies = 1 + snapshots.ring  # the last verified one, and the ring of earlier ones a rewind goes back to
    if snapshots.offload:
        out.add(f"verified snapshots (1 + ring {snapshots.ring}): in CPU memory ([snapshots] offload = true)",
                "0 B on the GPU", 0)
        return
    out.add(f"verified snapshots ([snapshots]: the last + a ring of {snapshots.ring}): trainable parameters + their "
            "optimizer state", f"{copies} x {trainable['lora']:,} x (4 + {2 if eight_bit else 8}) B"
            + (" + trainable base parameters" if other else ""), copies * (lora + other))


def activation_lines(out: Arithmetic, text, b: int, seq: int, a: int, checkpointing: bool) -> None:
    """Rough: per layer and token about 12 hidden + 5 FFN widths are kept (attention, MLP, LoRA dropout
    copies); with checkpointing only each layer's input, plus one layer being recomputed."""
    h, layers, ffn, vocab = text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.vocab_size
    per_layer = f"{b} x {seq} x (12 x {h} + 5 x {ffn}) x {a} B"
    if checkpointing:
        out.add("activations, checkpointed: layer inputs + one layer recomputed",
                f"{layers} x {b} x {seq} x {h} x {a} B + {per_layer}", b * seq * a * (layers * h + 12 * h + 5 * ffn))
    else:
        out.add("activations (no gradient checkpointing)", f"{layers} layers x {per_layer}",
                layers * b * seq * a * (12 * h + 5 * ffn))
    out.add("logits and loss (fp32 upcast)", f"{b} x {seq} x {vocab} x ({a} + 4 + 4) B", b * seq * vocab * (a + 8))


def estimate_memory(recipe, config, weights: dict[str, int], trainable: dict[str, int], gpu_mem: float,
                    world_size: int = 1) -> dict:
    """GPU memory of one rank: weights, trainable state, activations, logits, CUDA context; arithmetic shown.
    Under FSDP2 and ZeRO-3 weights, gradients and optimizer state are split over ``world_size`` ranks,
    plus the one layer being gathered (and the next, prefetched); under ZeRO-1/2 the trainable state only
    (ZeRO-1 keeps whole gradients: a little more than shown)."""
    t, q, wd = training_args_view(recipe), recipe.quantization, weight_dtype(recipe, config)
    a = 2 if (t.bf16 or t.fp16 or DTYPE_BYTES[wd] == 2 or (q.load_in_4bit and q.compute_dtype != "float32")) else 4
    b, seq = t.per_device_train_batch_size, recipe.data.max_length or 2048
    fsdp_own = str((getattr(t, "fsdp_config", None) or {}).get("activation_checkpointing", "false")).lower() == "true"
    checkpointing = bool(t.gradient_checkpointing or getattr(t, "activation_checkpointing", False) or fsdp_own)
    out = Arithmetic()
    weight_lines(out, q, weights, wd)
    n_weight_lines = len(out)
    trainable_lines(out, trainable, DTYPE_BYTES[wd], _enabled(recipe, "optim8bit"))
    snapshot_lines(out, trainable, DTYPE_BYTES[wd], _enabled(recipe, "optim8bit"), recipe.snapshots)
    sharding = sharding_of(recipe.training) if world_size > 1 else None
    text = getattr(config, "text_config", config)
    if sharding in ("FSDP2", "ZeRO-3"):  # the snapshot too: each rank copies its own shards
        shard_lines(out, world_size, sharding, text, weights, DTYPE_BYTES[wd])
    elif sharding:  # ZeRO-1/2: every rank holds the weights; the trainable state (and its snapshot) is split
        split_lines(out[n_weight_lines:], world_size, sharding)
    activation_lines(out, text, b, seq, a, checkpointing)
    out.add("CUDA context and workspace", "a fixed allowance", GiB)
    total = round(sum(x["gib"] for x in out), 2)
    return {"lines": list(out), "total_gib": total, "gpu_mem_gib": gpu_mem, "batch": b, "seq": seq,
            "checkpointing": checkpointing, "world_size": world_size, "sharded": sharding is not None, "sharding": sharding}


def sharding_of(training: dict) -> str | None:
    """How the engine splits memory over ranks: "FSDP2", "ZeRO-1/2/3", or None (single device, DDP)."""
    from stabguard.engine_check import engine_spec

    return engine_spec(training).sharding


def split_lines(lines: list[dict], world_size: int, sharding: str) -> None:
    for line in lines:
        line["what"] += f", 1/{world_size} per rank ({sharding})"
        line["arithmetic"] = f"({line['arithmetic']}) / {world_size}"
        line["gib"] = round(line["gib"] / world_size, 3)


def shard_lines(out: Arithmetic, world_size: int, sharding: str, text, weights: dict[str, int], wb: int) -> None:
    """FSDP2, ZeRO-3: every weight and trainable-state line so far is split over the ranks; two decoder
    layers (the one computing, the next prefetched) are gathered whole."""
    split_lines(out, world_size, sharding)
    per_layer = sum(weights.values()) / max(1, text.num_hidden_layers)
    out.add(f"{sharding}: two layers gathered (computing + prefetched)", f"2 x {per_layer:,.0f} x {wb} B",
            2 * per_layer * wb)


def _enabled(recipe, guard: str) -> bool:
    options = recipe.guards.get(guard)
    return bool(options is not None and options.enabled)
