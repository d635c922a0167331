"""Property tests: the collator's labels and the mask guard over generated conversations.

Run on the demo tokenizer and on the real Qwen BPE (dashscope's qwen.tiktoken, real special ids).

Generated text (``stabguard.testing.strategies``, public for plugin authors) is unicode with newlines,
empty replies, role words and near-misses of template markers ("<|assistant|>", "<|IM_END|>", ...). Exact special-token strings are left
out: the tokenizer would read them as markers, so the collator refuses such samples (tested in
test_collate.py). Plain added tokens such as "<think>" stay in: they are ordinary text to the template.

Expected reply text is NFC-normalised (both tokenizers normalise with NFC), and when a reply starts with
whitespace that the BPE merges into the header's last token ("\\n"), the loss sees that "\\n" too.
"""

from __future__ import annotations

import unicodedata
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from stabguard import EventLog, GuardError
from stabguard.collate import IGNORE_INDEX, ChatCollator
from stabguard.plugins.mask import MaskGuard, Options, expected_supervision, optional_supervision
from stabguard.testing.strategies import batches, replies_of

SETTINGS = settings(max_examples=40, deadline=timedelta(seconds=3),
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=["demo", "qwen"], scope="module")
def processor(request):
    return request.getfixturevalue(f"{request.param}_processor")


_COLLATORS: dict[tuple[int, str], ChatCollator] = {}


def collate(processor, samples, side="right") -> dict:
    key = (id(processor), side)
    if key not in _COLLATORS:
        _COLLATORS[key] = ChatCollator(processor, padding_side=side)
    return _COLLATORS[key](samples)


def runs(labels: torch.Tensor) -> list[list[int]]:
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    breaks = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
    return [labels[chunk].tolist() for chunk in torch.tensor_split(pos, breaks)] if len(pos) else []


def real(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask.bool()].tolist()


def _plain(sid: str, *turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"id": sid, "images": [],
            "messages": [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in zip(roles, turns)]}


EDGE_CASES = [  # replies that merge into the header's "\n" with the Qwen BPE, empty ones, near-miss markers
    _plain("e0", "q", "\n\nfoo", "<|im_start>assistant\n<|assistant|>", " \n x"),
    _plain("e1", "<|IM_END|> user\n", "", "\u3000\n", "\n"),
]


@SETTINGS
@example(samples=EDGE_CASES, side="right")
@example(samples=EDGE_CASES, side="left")
@given(samples=batches, side=st.sampled_from(["right", "left"]))
def test_supervised_tokens_are_exactly_each_reply_and_its_end_token(processor, samples, side):
    tok = processor.tokenizer
    batch = collate(processor, samples, side)
    tail = tok.decode([_COLLATORS[(id(processor), side)].markers.header[-1]])
    for row, sample in zip(batch["labels"], samples):
        seen = [tok.decode(run, clean_up_tokenization_spaces=False) for run in runs(row)]
        wanted = [unicodedata.normalize("NFC", r) + "<|im_end|>" for r in replies_of(sample)]
        assert len(seen) == len(wanted)
        for got, want in zip(seen, wanted):
            assert got == want or (got == tail + want and want[:1].isspace()), (got, want)


@SETTINGS
@example(samples=EDGE_CASES)
@given(samples=batches)
def test_labels_do_not_depend_on_batch_mates_or_padding_side(processor, samples):
    right, left = collate(processor, samples), collate(processor, samples, "left")
    for i, sample in enumerate(samples):
        alone = collate(processor, [sample])
        expected = alone["labels"][0].tolist()
        assert real(right["labels"][i], right["attention_mask"][i]) == expected
        assert real(left["labels"][i], left["attention_mask"][i]) == expected


def _supervise_one_prompt_token(batch, row, data):
    free = ((batch["labels"][row] == IGNORE_INDEX) & batch["attention_mask"][row].bool()).nonzero().flatten()
    at = free[data.draw(st.integers(0, len(free) - 1))]
    batch["labels"][row, at] = batch["input_ids"][row, at]


def _unsupervise_one_reply_token(batch, row, data):
    sup = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten()
    batch["labels"][row, sup[data.draw(st.integers(0, len(sup) - 1))]] = IGNORE_INDEX


def _no_mask(batch, row, data):  # the source note's collator when no marker is found
    batch["labels"][row] = batch["input_ids"][row]


def _first_turn_onwards(batch, row, data):  # masks only up to the first assistant reply
    first = (batch["labels"][row] != IGNORE_INDEX).nonzero()[0, 0]
    keep = batch["attention_mask"][row].bool() & (torch.arange(batch["labels"].shape[1]) >= first)
    batch["labels"][row] = torch.where(keep, batch["input_ids"][row], IGNORE_INDEX)


def _all_ignored(batch, row, data):
    batch["labels"][row] = IGNORE_INDEX


def _shifted(batch, row, data):
    batch["labels"][row] = torch.roll(batch["labels"][row], -1)


MUTATIONS = [_supervise_one_prompt_token, _unsupervise_one_reply_token, _no_mask, _first_turn_onwards,
             _all_ignored, _shifted]


@SETTINGS
@given(samples=batches, side=st.sampled_from(["right", "left"]), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_the_guard_accepts_collator_output_and_rejects_mutations(processor, samples, side, mutation, data):
    guard, events = MaskGuard(Options(), processor=processor), EventLog()
    batch = collate(processor, samples, side)
    guard.post_collate(batch=batch, samples=samples, events=events)
    assert not events.of_kind("finding")
    row, before = data.draw(st.integers(0, len(samples) - 1)), batch["labels"].clone()
    mutation(batch, row, data)
    # The newline after a reply's end token may be supervised or not (Qwen's own code supervises it).
    spans = expected_supervision(batch["input_ids"], batch["attention_mask"], guard.ids)
    either = torch.from_numpy(optional_supervision(batch["input_ids"], spans, guard.ids))
    assume(((before != batch["labels"]) & ~either).any())
    with pytest.raises(GuardError, match=f"sample {samples[row]['id']}: "):
        guard.post_collate(batch=batch, samples=samples, events=events)


@SETTINGS
@given(samples=batches.filter(lambda b: bool(b[0]["images"])))
def test_the_guard_rejects_supervised_image_pads(processor, samples):
    batch = collate(processor, samples)
    pads = batch["input_ids"][0] == processor.image_token_id
    batch["labels"][0, pads] = processor.image_token_id
    with pytest.raises(GuardError, match=r"sample s0: .*<\|image_pad\|> x"):
        MaskGuard(Options(strict=False), processor=processor).post_collate(batch=batch, samples=samples,
                                                                            events=EventLog())
