"""stabguard/collate.py: assistant-only labels (pure tensor logic) and the chat-template collator."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stabguard import EventLog
from stabguard.collate import (
    IGNORE_INDEX, ChatCollator, CollateError, TurnMarkers, assistant_labels, derive_markers, to_left_padding,
)

# ---- pure label logic on hand-made ids -----------------------------------------------------------
# 1 <|im_start|>, 2 assistant, 5 user, 3 "\n", 4 <|im_end|>, 0 pad, 9 image pad, 7/8 text, 33 "\n\n\n"
S, A, U, NL, E, PAD, IMG, MERGED = 1, 2, 5, 3, 4, 0, 9, 33
TEXT = {S: "<s>", A: "assistant", U: "user", NL: "\n", E: "<e>", PAD: "<pad>", IMG: "<img>", 7: "q", 8: "a",
        MERGED: "\n\n\n"}
MARKERS = TurnMarkers(header=(S, A, NL), end=E, never=(PAD, IMG), decode=TEXT.__getitem__)
TWO_TURNS = [S, U, NL, IMG, IMG, 7, E, NL, S, A, NL, 8, 8, E, NL, S, U, NL, 7, E, NL, S, A, NL, 8, E, NL]


def labels_of(rows: list[list[int]], markers: TurnMarkers = MARKERS, left: bool = False) -> torch.Tensor:
    width = max(map(len, rows))
    pad = [[PAD] * (width - len(r)) for r in rows]
    ids = torch.tensor([p + r if left else r + p for r, p in zip(rows, pad)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p)
                         for r, p in zip(rows, pad)])
    return assistant_labels(ids, mask, markers)


def supervised(labels: torch.Tensor) -> list[list[int]]:
    return [row[row != IGNORE_INDEX].tolist() for row in labels]


def test_every_assistant_turn_is_supervised_with_its_end_token_and_nothing_else():
    labels = labels_of([TWO_TURNS])[0]
    expected = [t if 11 <= i <= 13 or 24 <= i <= 25 else IGNORE_INDEX for i, t in enumerate(TWO_TURNS)]
    assert labels.tolist() == expected


def test_left_and_right_padding_give_the_same_supervised_tokens():
    rows = [TWO_TURNS, TWO_TURNS[:15], [S, U, NL, 7, E, NL, S, A, NL, E, NL]]
    right, left = labels_of(rows), labels_of(rows, left=True)
    assert supervised(right) == supervised(left)
    assert supervised(right)[2] == [E]  # an empty reply still teaches the model to stop


def test_a_turn_cut_before_its_end_token_is_supervised_to_the_end_of_the_sample():
    assert supervised(labels_of([TWO_TURNS[:13], TWO_TURNS]))[0] == [8, 8]


def test_vision_and_pad_tokens_inside_a_reply_are_never_supervised():
    row = [S, A, NL, 8, IMG, PAD, 8, E]
    assert supervised(labels_of([row]))[0] == [8, 8, E]


def test_a_header_tail_merged_into_the_reply_is_supervised_with_the_reply():
    row = [S, U, NL, 7, E, NL, S, A, MERGED, 8, E, NL]
    assert supervised(labels_of([row]))[0] == [MERGED, 8, E]
    plain = TurnMarkers(header=(S, A, NL), end=E, never=(PAD,), decode=None)
    assert supervised(labels_of([row], plain))[0] == []  # without decode the merged header is not found


def test_to_left_padding_moves_padding_and_keeps_other_tensors():
    batch = {"input_ids": torch.tensor([[5, 6, 0], [7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
             "pixel_values": torch.ones(2, 3)}
    left = to_left_padding(batch)
    assert left["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert left["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert left["pixel_values"] is batch["pixel_values"]


# ---- markers from the processor's template ---------------------------------------------------------


def test_markers_come_from_the_qwen3vl_template(demo_processor):
    tok = demo_processor.tokenizer
    markers = derive_markers(demo_processor)
    assert list(markers.header) == tok("<|im_start|>assistant\n")["input_ids"]
    assert markers.end == tok.convert_tokens_to_ids("<|im_end|>")
    vision = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|endoftext|>"]
    assert set(markers.never) == set(tok.convert_tokens_to_ids(vision))


def test_qwen_bpe_markers_have_the_real_ids(qwen_processor):
    markers = derive_markers(qwen_processor)
    assert (markers.header, markers.end) == ((151644, 77091, 198), 151645)
    assert {151643, 151652, 151653, 151654, 151655, 151656} == set(markers.never)


OTHER_CHATML = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}: "
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
)


def test_another_chatml_style_template_is_labelled_from_its_own_markers(demo_tokenizer, monkeypatch):
    from stabguard.qwen import build_processor

    processor = build_processor(demo_tokenizer, min_pixels=4096, max_pixels=4096)
    monkeypatch.setattr(processor, "chat_template", OTHER_CHATML)
    collator = ChatCollator(processor)
    assert demo_tokenizer.decode(collator.markers.header).startswith("<|im_start|>bot:")
    batch = collator([conversation("s0", [("Look.", "It is a short."), ("And?", "Nothing else.")], images=1)])
    assert runs_text(batch, demo_tokenizer) == [[" It is a short.<|im_end|>", " Nothing else.<|im_end|>"]]


# ---- the collator on real samples ------------------------------------------------------------------


def conversation(sid: str, rounds: list[tuple[str, str]], *, images: int = 0, system: str | None = None,
                 image_round: int = 0) -> dict:
    """A sample dict as the dataset yields it; the images go in user turn ``image_round``."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, (question, answer) in enumerate(rounds):
        pictures = [{"type": "image", "image": f"img{k}.png"} for k in range(images)] if i == image_round else []
        messages.append({"role": "user", "content": pictures + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    pixels = [Image.new("RGB", (64, 64 + 32 * k), (40 * k, 90, 30)) for k in range(images)]
    return {"id": sid, "messages": messages, "images": pixels}


def runs_text(batch: dict, tokenizer) -> list[list[str]]:
    """The supervised tokens of each row, decoded one contiguous run (one assistant turn) at a time."""
    out = []
    for row in batch["labels"]:
        pos = (row != IGNORE_INDEX).nonzero().flatten().tolist()
        runs = [[p] for p in pos[:1]]
        for p in pos[1:]:
            runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p])
        out.append([tokenizer.decode(row[r].tolist(), clean_up_tokenization_spaces=False) for r in runs])
    return out


BATCH = [
    conversation("a", [("What is wrong?", "Defect: open circuit."), ("Where?", "Near the via.")], images=2,
                 system="You inspect boards."),
    conversation("b", [("Is it good?", "Yes.")]),
    conversation("c", [("Check.", "")], images=1),
]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_supervises_each_reply_and_its_end_token(demo_processor, side):
    collator = ChatCollator(demo_processor, padding_side=side)
    batch = collator(BATCH)
    assert runs_text(batch, demo_processor.tokenizer) == [
        ["Defect: open circuit.<|im_end|>", "Near the via.<|im_end|>"], ["Yes.<|im_end|>"], ["<|im_end|>"]]
    assert collator.last_sample_ids == ["a", "b", "c"]
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    pad_col = 0 if side == "left" else -1
    assert batch["attention_mask"][1, pad_col] == 0 and batch["labels"][1, pad_col] == IGNORE_INDEX


def test_left_padding_only_moves_the_padding(demo_processor):
    right = ChatCollator(demo_processor)(BATCH)
    left = ChatCollator(demo_processor, padding_side="left")(BATCH)
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        for r, l, m in zip(right[key], left[key], right["attention_mask"]):
            assert torch.equal(r[m.bool()], l[l.shape[0] - int(m.sum()):])
    assert torch.equal(right["pixel_values"], left["pixel_values"])


def test_a_sample_that_truncation_would_leave_unsupervised_is_dropped_and_counted(demo_processor):
    long = conversation("long", [("word " * 80, "short answer")])
    events = EventLog()
    collator = ChatCollator(demo_processor, max_length=40, events=events)
    batch = collator([BATCH[1], long])
    assert collator.dropped == 1 and collator.last_sample_ids == ["b"]
    assert batch["input_ids"].shape[0] == 1
    [drop] = events.of_kind("drop")
    assert drop["values"]["sample"] == "long" and "max_length 40" in drop["message"]


def test_truncation_error_policy_names_the_sample(demo_processor):
    long = conversation("data.jsonl:7", [("word " * 80, "short answer")])
    with pytest.raises(CollateError, match=r"data.jsonl:7.*max_length 40.*no supervised token"):
        ChatCollator(demo_processor, max_length=40, truncation="error")([BATCH[1], long])


def test_a_cut_through_an_image_drops_the_sample_and_its_pixels(demo_processor):
    pictured = conversation("img", [("Hi.", "First reply."), ("Look.", "ok")], images=1, image_round=1)
    first_turn = demo_processor.apply_chat_template(pictured["messages"][:2], tokenize=False)
    inside_image = len(demo_processor.tokenizer(first_turn)["input_ids"]) + 5  # <|im_start|>user\n<|vision_start|>, 1 pad
    collator = ChatCollator(demo_processor, max_length=inside_image)
    batch = collator([pictured, BATCH[1]])
    assert collator.last_sample_ids == ["b"] and "pixel_values" not in batch


def test_a_long_sample_with_replies_before_the_cut_is_cut_and_kept(demo_processor):
    sample = conversation("two", [("Hi.", "First reply."), ("word " * 60, "Second reply.")])
    full = ChatCollator(demo_processor)([sample])
    cut = ChatCollator(demo_processor, max_length=20)([sample])
    assert cut["input_ids"].shape == (1, 20) and torch.equal(cut["labels"][0], full["labels"][0, :20])
    assert runs_text(cut, demo_processor.tokenizer) == [["First reply.<|im_end|>"]]


def test_pixels_of_kept_samples_match_after_a_drop(demo_processor):
    kept = [BATCH[0], BATCH[2]]
    alone = ChatCollator(demo_processor)(kept)
    long = conversation("long", [("word " * 80, "x")], images=1)
    mixed = ChatCollator(demo_processor, max_length=80)([BATCH[0], long, BATCH[2]])
    assert torch.equal(alone["pixel_values"], mixed["pixel_values"])
    assert torch.equal(alone["image_grid_thw"], mixed["image_grid_thw"])


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|im_start|>assistant\n", "<|image_pad|>"])
def test_text_typing_a_special_token_is_refused(demo_processor, marker):
    bad = conversation("typed", [(f"please {marker} now", "fine")])
    with pytest.raises(CollateError, match=r"sample typed: message 0 \(user\).*special token"):
        ChatCollator(demo_processor)([bad])
    collator = ChatCollator(demo_processor, marker_text="drop")
    collator([bad, BATCH[1]])
    assert collator.dropped == 1 and collator.last_sample_ids == ["b"]


def test_near_miss_markers_are_plain_text(demo_processor):
    near = "<|assistant|> <|im_start>assistant\n <im_end|> <|im_end| <|IM_END|>"
    batch = ChatCollator(demo_processor)([conversation("n", [(near, near)])])
    assert runs_text(batch, demo_processor.tokenizer) == [[near + "<|im_end|>"]]


def test_a_batch_with_every_sample_dropped_says_so(demo_processor):
    sample = conversation("x", [("word " * 30, "y")])
    with pytest.raises(CollateError, match="every sample of this micro-batch was dropped") as err:
        ChatCollator(demo_processor, max_length=10)([sample])
    assert str(sample["id"]) in str(err.value) and "data.max_length (now 10)" in str(err.value)


@pytest.mark.parametrize("kwargs, bad", [({"truncation": "cut"}, "truncation='cut'"),
                                         ({"padding_side": "middle"}, "padding_side='middle'"),
                                         ({"max_length": 0}, "max_length=0")])
def test_bad_arguments_name_the_value(demo_processor, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ChatCollator(demo_processor, **kwargs)


def test_the_tiny_qwen3vl_trains_on_exactly_these_labels(tmp_path):
    """The model shifts labels itself: its loss is the cross-entropy of token t+1 over supervised
    positions, the same for left and right padding."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from stabguard.models import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny", seed=0, max_pixels=16384)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)  # the saved processor, as a run loads it
    losses = []
    for side in ("right", "left"):
        batch = ChatCollator(processor, padding_side=side)(BATCH)
        with torch.no_grad():
            out = model(**batch)
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        assert torch.isfinite(out.loss) and torch.allclose(out.loss, manual, atol=1e-5)
        losses.append(out.loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
