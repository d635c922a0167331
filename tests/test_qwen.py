"""Tests for stabguard/qwen.py: the Qwen3-VL chat template, the demo tokenizer and the real Qwen BPE."""

from __future__ import annotations

import pytest

from support import CONVERSATION, REFERENCE

from stabguard import qwen


# ---- chat template -------------------------------------------------------------------------------

def test_chat_template_renders_the_reference_format():
    processor = qwen.build_processor(qwen.build_demo_tokenizer())
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == REFERENCE


def test_chat_template_string_content_system_turn_and_generation_prompt():
    tokenizer = qwen.build_demo_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"


# ---- tokenizers ----------------------------------------------------------------------------------

def test_demo_tokenizer_is_deterministic_and_has_qwen_specials():
    first, second = qwen.build_demo_tokenizer(), qwen.build_demo_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 1000 <= len(first) <= 4096
    ids = first.convert_tokens_to_ids([token for token, _ in qwen.QWEN_ADDED_TOKENS])
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == len(first) - 1
    assert first.pad_token == "<|endoftext|>" and first.eos_token == "<|im_end|>"
    assert first.convert_tokens_to_ids("<|assistant|>") is None  # no unk: never aliased to the pad id
    text = "Défaut: court-circuit près du connecteur 电路 🔧"
    assert first.decode(first.encode(text)) == text


def test_demo_tokenizer_uses_qwens_split_pattern():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert qwen.QWEN_SPLIT_PATTERN == PRETOKENIZE_REGEX


def test_qwen_tokenizer_matches_the_real_ids():
    pytest.importorskip("dashscope")
    tokenizer = qwen.build_qwen_tokenizer()
    assert tokenizer.encode("assistant") == [77091]
    assert tokenizer.encode("\n") == [198]
    assert tokenizer.encode("user") == [872]
    assert tokenizer.encode("system") == [8948]
    assert tokenizer.encode("<|assistant|>") == [27, 91, 77091, 91, 29]
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<think>": 151667, "</think>": 151668}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    header = [151644, 77091, 198]
    assert any(ids[i:i + 3] == header for i in range(len(ids)))
    assert tokenizer.decode(ids) == REFERENCE
