"""Tests for stabguard/models.py: tiny Qwen3-VL build/save/load, LoRA, 4-bit, and the names it re-exports."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from support import CONVERSATION, REFERENCE

from stabguard import models, qwen

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return models.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _sections(path, *, model_class="Qwen3VLForConditionalGeneration", targets=TEXT_TARGETS, tiny=None):
    model = SimpleNamespace(
        name_or_path=str(path), model_class=model_class, dtype="auto", attn_implementation="sdpa",
        tiny=tiny, min_pixels=None, max_pixels=None,
    )
    lora = SimpleNamespace(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=targets, bias="none")
    quant = SimpleNamespace(
        load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="bfloat16",
        skip_modules=["model.visual", "lm_head"],
    )
    return model, lora, quant


def _batch(processor, size=(64, 64)):
    image = Image.new("RGB", size, (30, 140, 60))
    image.paste((200, 170, 40), (8, 8, 40, 20))  # a copper-coloured trace, so the image is not flat
    text = processor.apply_chat_template(CONVERSATION, tokenize=False)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


# ---- tiny model ----------------------------------------------------------------------------------

def test_tiny_model_saves_and_loads_back(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tiny_dir / name).is_file(), name
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == REFERENCE
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.dtype == torch.float32


def test_tiny_model_forward_backward_with_an_image(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    batch = _batch(processor)
    grid = batch["image_grid_thw"][0]
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == int(grid.prod()) // 4
    out = model(**batch)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    patch_grad = model.model.visual.patch_embed.proj.weight.grad
    assert patch_grad is not None and torch.isfinite(patch_grad).all() and patch_grad.abs().sum() > 0


def test_tiny_model_is_deterministic_by_seed(tmp_path, tiny_dir):
    same = load_file(models.build_tiny_model(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(models.build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(tiny_dir / "model.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


def test_tiny_config_overrides_and_typos():
    tokenizer = qwen.build_demo_tokenizer()
    config = models.tiny_config(tokenizer, text_config={"hidden_size": 32, "head_dim": 8},
                                vision_config={"depth": 1}, tie_word_embeddings=True)
    assert config.text_config.hidden_size == 32 and config.vision_config.depth == 1
    assert config.vision_config.out_hidden_size == 32  # follows the text width
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 4
    assert config.tie_word_embeddings is True
    typos = r"model\.tiny\.text_config\.num_hiden_layers.*model\.tiny\.hidden_size"
    with pytest.raises(ValueError, match=typos):
        models.tiny_config(tokenizer, text_config={"num_hiden_layers": 1}, hidden_size=3)


# ---- load_model ----------------------------------------------------------------------------------

def test_load_model_builds_tiny_and_lora_hits_text_layers_only(tmp_path):
    model_section, lora, quant = _sections(tmp_path / "built", tiny={"seed": 3})
    model, processor = models.load_model(model_section, lora, quant)
    assert (tmp_path / "built" / "model.safetensors").is_file()
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and not [n for n in lora_names if ".visual." in n]
    assert all(".language_model.layers." in n for n in lora_names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_names)
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == REFERENCE


def test_all_linear_lora_also_hits_the_vision_tower(tiny_dir):
    model, _ = models.load_model(*_sections(tiny_dir, targets="all-linear"))
    assert any(".visual." in n and "lora_" in n for n, _ in model.named_parameters())


def test_load_model_through_auto_class_and_pixel_limits(tiny_dir):
    model_section, lora, quant = _sections(tiny_dir, model_class="AutoModelForImageTextToText")
    model_section.max_pixels = 16 * 32 * 32
    lora.enabled = False
    model, processor = models.load_model(model_section, lora, quant)
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert processor.image_processor.size["longest_edge"] == 16 * 32 * 32
    assert _batch(processor, size=(512, 512))["image_grid_thw"][0].prod() // 4 <= 16


@pytest.mark.parametrize("name", ["AutoModelForVision2Seq", "Qwen3VLForCausalLMX", "Qwen3VLConfig"])
def test_wrong_model_class_is_a_clear_error(tmp_path, name):
    with pytest.raises(ValueError, match=rf"model\.model_class: '{name}'.*AutoModelForImageTextToText"):
        models.load_model(*_sections(tmp_path / "never", model_class=name, tiny={}))
    assert not (tmp_path / "never").exists()  # failed before building anything


def test_dtype_auto_is_float32_on_cpu_and_bad_names_are_named():
    if not torch.cuda.is_available():
        assert models.resolve_dtype("auto") is torch.float32
    assert models.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype: 'bf16'"):
        models.resolve_dtype("bf16")


def test_qlora_keeps_vision_tower_unquantized(tiny_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model_section, lora, quant = _sections(tiny_dir)
    quant.load_in_4bit = True
    model, processor = models.load_model(model_section, lora, quant)
    modules = dict(model.named_modules())
    assert not [n for n, m in modules.items() if ".visual." in n and isinstance(m, bnb.nn.Linear4bit)]
    assert [n for n, m in modules.items() if n.endswith("layers.0.self_attn.q_proj.base_layer")
            and isinstance(m, bnb.nn.Linear4bit)]
    out = model(**_batch(processor))
    out.loss.backward()
    assert math.isfinite(out.loss.item())


def test_the_qwen_names_are_still_importable_from_models():
    names = ["QWEN3VL_CHAT_TEMPLATE", "QWEN3VL_MAX_PIXELS", "QWEN3VL_MIN_PIXELS", "QWEN_ADDED_TOKENS",
             "QWEN_FIRST_ADDED_ID", "QWEN_SPLIT_PATTERN", "build_demo_tokenizer", "build_processor",
             "build_qwen_tokenizer"]
    assert [name for name in names if getattr(models, name, None) is not getattr(qwen, name)] == []
