"""plugins/mask.py: the labels audit catches the wrong masks that train silently."""

from __future__ import annotations

import copy

import pluggy
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from stabguard import EventLog, GuardError, hookspecs
from stabguard.collate import ChatCollator, assistant_labels, derive_markers
from stabguard.plugins import mask
from stabguard.plugins.mask import MaskGuard, Options, check_marker


def sample(sid: str, rounds: list[tuple[str, str]], images: int = 0) -> dict:
    messages = []
    for i, (question, answer) in enumerate(rounds):
        pictures = [{"type": "image", "image": f"p{k}.png"} for k in range(images)] if i == 0 else []
        messages.append({"role": "user", "content": pictures + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"id": sid, "messages": messages, "images": [Image.new("RGB", (64, 64), (9, 99, 9))] * images}


SAMPLES = [
    sample("train.jsonl:1", [("Inspect this PCB.", "Defect: short."), ("Where?", "Near the via.")], images=1),
    sample("train.jsonl:2", [("Is the board good? Look closely at every trace and pad.", "Yes.")]),
]


def guard(processor, **options) -> MaskGuard:
    return MaskGuard(Options(**options), processor=processor)


def seed_collator(processor):
    """The source note's PCBDataCollator, verbatim in its masking logic (seed.md, measure 1)."""
    def collate(samples):
        texts = [processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
        images = [im for s in samples for im in s["images"]] or None
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = inputs["input_ids"].clone()
        assistant_token_id = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
        for i, label in enumerate(labels):  # noqa: B007 - the source note's code, verbatim
            assistant_starts = (inputs["input_ids"][i] == assistant_token_id).nonzero()
            if len(assistant_starts) > 0:
                start_pos = assistant_starts[0].item()
                labels[i, :start_pos] = -100
        inputs["labels"] = labels
        return dict(inputs)
    return collate


@pytest.fixture(scope="module")
def unk_processor(demo_tokenizer):
    """Like the demo processor, but its tokenizer has transformers 5's default unk <|endoftext|> (= pad)."""
    from stabguard.qwen import build_processor

    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.unk_token = "<|endoftext|>"
    return build_processor(tokenizer, min_pixels=4096, max_pixels=4096)


# ---- a correct mask passes, and the first batch is decoded -------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_collators_batches_pass_and_the_first_is_decoded(demo_processor, side):
    events, g = EventLog(), guard(demo_processor)
    batch = ChatCollator(demo_processor, padding_side=side)(SAMPLES)
    g.post_collate(batch=batch, samples=SAMPLES, events=events)
    g.post_collate(batch=batch, samples=SAMPLES, events=events)
    assert not events.of_kind("finding") and not events.of_kind("alert")
    seen = [e for e in events.of_kind("info") if "what the loss sees" in e["message"]]
    assert [e["values"]["sample"] for e in seen] == ["train.jsonl:1", "train.jsonl:2"]  # first batch only
    assert seen[0]["values"]["spans"] == ["Defect: short.<|im_end|>", "Near the via.<|im_end|>"]


def test_the_newline_after_a_reply_s_end_may_be_supervised_as_qwen_s_own_code_does(demo_processor):
    """Qwen3-VL's fine-tuning code and ms-swift supervise the "\\n" after each <|im_end|>: not a finding.
    A "\\n" supervised anywhere else still is."""
    batch = ChatCollator(demo_processor)(SAMPLES[:1])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    end, newline = demo_processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), ids[-1].item()
    closing = [i for i in range(1, len(ids)) if labels[i - 1] == end and ids[i] == newline]
    assert len(closing) == 2, "two replies, each ended by <|im_end|> and a newline"
    for i in closing:
        labels[i] = ids[i]
    events = EventLog()
    guard(demo_processor).post_collate(batch=batch, samples=SAMPLES[:1], events=events)
    assert not events.of_kind("finding")
    elsewhere = next(i for i in range(len(ids)) if ids[i] == newline and labels[i] == -100)
    labels[elsewhere] = newline
    with pytest.raises(GuardError, match=r"1 tokens supervised outside them \(first: '\\n'\)"):
        guard(demo_processor).post_collate(batch=batch, samples=SAMPLES[:1], events=EventLog())


def test_a_bare_tokenizer_as_the_processor_reads_the_same_template(demo_processor, demo_tokenizer):
    """TRL and the frameworks pass the tokenizer as ``processing_class``; the guard reads it the same way."""
    from_tokenizer, from_processor = guard(demo_tokenizer), guard(demo_processor)
    assert from_tokenizer.ids.header.tolist() == from_processor.ids.header.tolist()
    assert from_tokenizer.ids.end == from_processor.ids.end
    assert from_tokenizer.ids.forbidden.tolist() == from_processor.ids.forbidden.tolist(), "vision tokens too"
    batch = ChatCollator(demo_processor)(SAMPLES)
    batch["labels"][0, 0] = batch["input_ids"][0, 0]  # <|im_start|> of the first user turn
    with pytest.raises(GuardError, match="sample train.jsonl:1: .*tokens supervised outside them"):
        from_tokenizer.post_collate(batch=batch, samples=SAMPLES, events=EventLog())


# ---- the source note's collator -------------------------------------------------------------------


def test_the_note_collator_crashes_without_an_unk_token_and_its_marker_is_caught_before_training(demo_processor):
    with pytest.raises(AttributeError, match="nonzero"):
        seed_collator(demo_processor)(SAMPLES)
    g = MaskGuard(Options(markers=["<|assistant|>"]))
    with pytest.raises(GuardError, match=r"'<\|assistant\|>' is not a token.*5 tokens.*None \(no unk token\)"):
        g.setup_model(processor=demo_processor, events=EventLog())


def test_the_note_marker_with_an_unk_token_is_caught_before_training(unk_processor):
    with pytest.raises(GuardError, match=r"the unk token '<\|endoftext\|>' and the pad token: a search finds padding"):
        MaskGuard(Options(markers=["<|assistant|>"])).setup_model(processor=unk_processor, events=EventLog())


@pytest.mark.parametrize("strict", [True, False])
def test_the_note_collators_two_silent_forms_are_caught(unk_processor, strict):
    batch = seed_collator(unk_processor)(SAMPLES)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]  # one sample is padded, the other is not
    unpadded, padded = (0, 1) if lengths[0] > lengths[1] else (1, 0)
    events = EventLog()
    with pytest.raises(GuardError) as raised:
        guard(unk_processor, strict=strict).post_collate(batch=batch, samples=SAMPLES, events=events)
    found = {e["values"]["sample"]: e["message"] for e in events.of_kind("finding")}
    no_mask, pads_only = found[SAMPLES[unpadded]["id"]], found[SAMPLES[padded]["id"]]
    assert "supervised share 1.000 outside" in no_mask and "<|image_pad|>" in no_mask  # no mask at all
    assert "padding positions (attention_mask 0) supervised" in pads_only and "<|endoftext|>" in pads_only
    if strict:
        assert "tokens supervised outside them (first: '<|im_start|>user" in no_mask
        assert "reply tokens left out" in pads_only
    assert SAMPLES[0]["id"] in str(raised.value) and SAMPLES[1]["id"] in str(raised.value)


# ---- the other wrong masks -------------------------------------------------------------------------


def test_masking_only_up_to_the_first_assistant_turn_is_caught(demo_processor):
    batch = ChatCollator(demo_processor)(SAMPLES[:1])
    first_reply = (batch["labels"][0] != -100).nonzero()[0, 0]
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :first_reply] = -100
    with pytest.raises(GuardError, match=r"sample train.jsonl:1: .*tokens supervised outside them "
                                         r"\(first: '<\|im_start\|>user\\nWhere\?"):
        guard(demo_processor).post_collate(batch=batch, samples=SAMPLES[:1], events=EventLog())


def test_a_sample_left_all_minus_100_by_truncation_is_caught(demo_processor):
    texts = [demo_processor.apply_chat_template(s["messages"], tokenize=False) for s in SAMPLES[1:]]
    batch = dict(demo_processor(text=texts, truncation=True, max_length=12, return_tensors="pt"))
    batch["labels"] = assistant_labels(batch["input_ids"], batch["attention_mask"], derive_markers(demo_processor))
    with pytest.raises(GuardError, match=r"sample train.jsonl:2: no supervised token"):
        guard(demo_processor).post_collate(batch=batch, samples=SAMPLES[1:], events=EventLog())


@pytest.mark.parametrize("strict", [True, False])
def test_image_pads_left_supervised_are_caught(demo_processor, strict):
    batch = ChatCollator(demo_processor)(SAMPLES)
    pads = batch["input_ids"] == demo_processor.image_token_id
    batch["labels"][pads] = batch["input_ids"][pads]
    with pytest.raises(GuardError, match=r"sample train.jsonl:1: .*4 vision/padding tokens supervised \(<\|image_pad\|> x4\)"):
        guard(demo_processor, strict=strict).post_collate(batch=batch, samples=SAMPLES, events=EventLog())


def test_a_batch_where_every_label_is_minus_100_is_caught(demo_processor):
    batch = ChatCollator(demo_processor)(SAMPLES)
    batch["labels"][:] = -100
    with pytest.raises(GuardError, match=r"every label in the batch is -100: the loss would be 0/0 = NaN"):
        MaskGuard(Options()).post_collate(batch=batch, samples=SAMPLES, events=EventLog())  # no processor needed


def test_a_batch_without_labels_is_refused(demo_processor):
    batch = ChatCollator(demo_processor)(SAMPLES)
    del batch["labels"]
    with pytest.raises(GuardError, match="no 'labels'"):
        guard(demo_processor).post_collate(batch=batch, samples=SAMPLES, events=EventLog())


def test_labels_shifted_before_the_model_are_caught(demo_processor):
    batch = ChatCollator(demo_processor)(SAMPLES)
    batch["labels"] = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    with pytest.raises(GuardError, match="labels differ from input_ids"):
        guard(demo_processor, strict=False).post_collate(batch=batch, samples=SAMPLES, events=EventLog())


def test_a_pad_token_that_is_also_the_end_token_still_lets_replies_end(demo_tokenizer):
    from stabguard.qwen import build_processor

    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.pad_token = "<|im_end|>"  # the common "pad = eos" set-up
    processor = build_processor(tokenizer, min_pixels=4096, max_pixels=4096)
    batch = ChatCollator(processor, padding_side="left")(SAMPLES)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (batch["labels"] == end).sum(1).tolist() == [2, 1]
    events = EventLog()
    guard(processor).post_collate(batch=batch, samples=SAMPLES, events=events)
    assert not events.of_kind("finding")
    batch["labels"][batch["attention_mask"] == 0] = end  # padding (= <|im_end|>) supervised
    with pytest.raises(GuardError, match="padding positions"):
        guard(processor).post_collate(batch=batch, samples=SAMPLES, events=events)


# ---- policies and options --------------------------------------------------------------------------


def broken_batch(processor) -> dict:
    batch = ChatCollator(processor)(SAMPLES)
    batch["labels"][1] = batch["input_ids"][1]  # sample 2: no mask
    return batch


def test_skip_sample_drops_only_the_bad_samples_labels(demo_processor):
    batch, events = broken_batch(demo_processor), EventLog()
    good = batch["labels"][0].clone()
    guard(demo_processor, policy="skip_sample").post_collate(batch=batch, samples=SAMPLES, events=events)
    assert (batch["labels"][1] == -100).all() and torch.equal(batch["labels"][0], good)
    assert [e["values"]["sample"] for e in events.of_kind("skip")] == ["train.jsonl:2"]
    assert not events.of_kind("alert")


def test_skip_sample_alerts_when_no_sample_is_left(demo_processor):
    batch, events = broken_batch(demo_processor), EventLog()
    batch["labels"][0] = -100
    guard(demo_processor, policy="skip_sample").post_collate(batch=batch, samples=SAMPLES, events=events)
    [alert] = events.of_kind("alert")
    assert "every sample of the batch skipped: its loss is 0/0 = NaN" in alert["message"]


def test_warn_keeps_the_labels_and_alerts_naming_the_sample(demo_processor):
    batch, events = broken_batch(demo_processor), EventLog()
    before = batch["labels"].clone()
    guard(demo_processor, policy="warn").post_collate(batch=batch, samples=SAMPLES, events=events)
    assert torch.equal(batch["labels"], before)
    [alert] = events.of_kind("alert")
    assert "sample train.jsonl:2" in alert["message"] and "train.jsonl:1" not in alert["message"]


def test_rows_are_named_by_index_when_samples_do_not_line_up(demo_processor):
    with pytest.raises(GuardError, match=r"sample row 1: "):
        guard(demo_processor).post_collate(batch=broken_batch(demo_processor), samples=SAMPLES[:1], events=EventLog())


def test_share_bounds_apply(demo_processor):
    batch = ChatCollator(demo_processor)(SAMPLES)
    with pytest.raises(GuardError, match=r"train.jsonl:1: supervised share 0.\d+ outside \[0.5, 0.99\]"):
        guard(demo_processor, min_share=0.5).post_collate(batch=batch, samples=SAMPLES, events=EventLog())


@pytest.mark.parametrize("options, key", [({"policy": "skip"}, "policy"), ({"max_share": 2}, "max_share"),
                                          ({"min_share": 0.6, "max_share": 0.5}, "min_share"),
                                          ({"stirct": True}, "stirct")])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValidationError, match=key):
        Options(**options)


def test_check_marker_on_the_real_qwen_vocabulary(qwen_tokenizer):
    assert check_marker(qwen_tokenizer, "<|im_end|>") == 151645
    with pytest.raises(GuardError, match=r"\[27, 91, 77091, 91, 29\]"):
        check_marker(qwen_tokenizer, "<|assistant|>")


def test_the_guard_registers_and_its_setup_model_hook_binds_the_processor(demo_processor):
    pm = pluggy.PluginManager("stabguard")
    pm.add_hookspecs(hookspecs)
    pm.register(mask)
    registered = []
    pm.hook.register_guards(register=lambda *a: registered.append(a))
    assert registered == [("mask", Options, MaskGuard)]
    g = MaskGuard(Options())
    pm.register(g)
    pm.check_pending()
    events = EventLog()
    pm.hook.setup_model(model=None, processor=demo_processor, recipe=None, events=events)
    assert g.ids is not None and g.ids.end == demo_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(GuardError, match="train.jsonl:2"):
        pm.hook.post_collate(batch=broken_batch(demo_processor), samples=SAMPLES, events=events)


def test_replies_that_merge_into_the_header_pass_on_the_real_qwen_bpe(qwen_processor):
    """Qwen's BPE writes "assistant\\n" + "\\n\\nfoo" as "assistant", "\\n\\n\\n", "foo": both sides must agree."""
    merged = [sample("m1", [("q", "\n\nfoo"), ("r", " \n x")]), sample("m2", [("q", "\n")])]
    batch = ChatCollator(qwen_processor)(merged)
    events = EventLog()
    guard(qwen_processor).post_collate(batch=batch, samples=merged, events=events)
    assert not events.of_kind("finding")
    assert [e["values"]["spans"] for e in events.of_kind("info")] == [
        ["\n\n\nfoo<|im_end|>", "\n \n x<|im_end|>"], ["\n\n<|im_end|>"]]
