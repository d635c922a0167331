"""Chat-template collator with assistant-only labels.

The loss must see exactly what the model should learn to write: every assistant reply and the
end-of-turn token that closes it (so it learns to stop), in every assistant turn. Everything else --
system and user turns, the ``<|im_start|>assistant\\n`` header, vision tokens, padding -- is -100.

Turn boundaries are token ids read off the processor's own chat template by rendering probe
conversations, so a template change (or another ChatML-style template) cannot silently break them.
Labels are built for the whole batch with array ops; only a handful of per-turn lookups run in Python.

Decisions:
- The newline after ``<|im_end|>`` is *not* supervised: generation stops at ``<|im_end|>`` (the eos),
  so the model never writes it. (Qwen's own fine-tuning code supervises it; it changes nothing.)
- Byte-level BPEs may merge the header's trailing whitespace into a reply that starts with whitespace
  (``"\\n" + "\\n\\nfoo"`` is one ``"\\n\\n\\n"`` token). That token carries reply text, so it is
  supervised: the loss then sees the header's tail plus the reply.
- Text that contains a special token string (a user typing ``<|im_end|>``) would be read as a template
  marker by the tokenizer and corrupt the turn structure; such samples are refused (error or drop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from stabguard import IGNORE_INDEX

_PROBE_USER = "Probe question about the board?"
_PROBE_REPLIES = ("Alpha probe reply x", "Zulu other answer q")


class CollateError(ValueError):
    """A batch cannot be built (a sample too long under ``truncation="error"``, marker text, ...)."""


@dataclass
class TurnMarkers:
    """Token ids that delimit assistant turns, as the tokenizer writes them in context.

    ``header`` opens an assistant turn (not supervised), ``end`` closes every turn (supervised after a
    reply), ``never`` may never be supervised (vision tokens, padding). ``decode`` turns one id into
    text; it decides whether a token merged the header's last token with the reply's first characters.
    """

    header: tuple[int, ...]
    end: int
    never: tuple[int, ...] = ()
    decode: Callable[[int], str] | None = None
    _merged: dict[int, bool] = field(default_factory=dict, repr=False)
    _never_table: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    def is_never(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask of ``never`` ids: a lookup table over the vocabulary (cheaper than isin)."""
        try:
            return self._never_table[ids]
        except IndexError:  # the first call, or ids past the table: size it to the largest id seen
            self._never_table = np.zeros(max(int(ids.max()), *self.never) + 1, dtype=bool)
            self._never_table[list(self.never)] = True
            return self._never_table[ids]

    def merged_tail(self, ids: np.ndarray) -> np.ndarray:
        """True where a token is the header's last token merged with reply text (cached per id)."""
        if self.decode is None:
            return np.zeros(ids.shape, dtype=bool)
        tail = self.decode(self.header[-1])
        for tid in set(ids.tolist()) - self._merged.keys():
            text = self.decode(tid)
            self._merged[tid] = len(text) > len(tail) and text.startswith(tail)
        return np.array([self._merged[tid] for tid in ids.tolist()], dtype=bool)


def reply_starts(ids: np.ndarray, markers: TurnMarkers) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the first reply position of every assistant turn (after its header).

    Only the few positions holding the header's first token are examined (no per-token window). A
    header that ends its row gives column L (no reply inside the row).
    """
    n, length = len(markers.header), ids.shape[1]
    row, at = np.nonzero(ids == markers.header[0])
    follow = at[:, None] + np.arange(n)
    heads = np.where(follow < length, ids[row[:, None], np.minimum(follow, length - 1)], -1)
    same = heads == markers.header
    start = np.where(same.all(1), at + n, -1)
    if n > 1:  # a one-token header is a special token: nothing can merge into it
        loose = np.flatnonzero(same[:, :-1].all(1) & ~same[:, -1] & (heads[:, -1] >= 0))
        if loose.size:
            merged = loose[markers.merged_tail(heads[loose, -1])]
            start[merged] = at[merged] + n - 1
    found = start >= 0
    return row[found], start[found]


def label_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, markers: TurnMarkers) -> tuple[torch.Tensor, np.ndarray]:
    """Labels, and the number of assistant turns found per row.

    Two kinds of event mark a row: a reply starts (odd code 2p+1) and a turn has ended (even code 2p,
    at the position after an end token); they never share a position. A running maximum gives the
    latest event at each position: supervised where it is a reply start. Works for any padding side.
    NumPy inside: on CPU batches this size its per-op cost is about half of torch's (bench/collator.py).
    """
    ids = input_ids.numpy()
    rows, length = ids.shape
    row, col = reply_starts(ids, markers)
    events = np.zeros((rows, length + 1), dtype=np.int32)
    events[:, 1:length] = (ids[:, :-1] == markers.end) * np.arange(2, 2 * length, 2, dtype=np.int32)
    events[row, col] = 2 * col + 1
    keep = np.maximum.accumulate(events[:, :length], axis=1) & 1 == 1
    keep &= attention_mask.numpy() != 0
    if markers.never:
        keep &= ~markers.is_never(ids)
    return torch.from_numpy(np.where(keep, ids, IGNORE_INDEX)), np.bincount(row, minlength=rows)


def assistant_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, markers: TurnMarkers) -> torch.Tensor:
    """Labels for a batch: reply tokens and the end token of each assistant turn, -100 elsewhere."""
    return label_rows(input_ids, attention_mask, markers)[0]


# ------------------------------------------------------------------------------------------------
# Markers from the processor's own template
# ------------------------------------------------------------------------------------------------


def _probe(processor: Any, reply: str | None) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "text", "text": _PROBE_USER}]}]
    if reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor.tokenizer(text)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special added tokens (markers the template writes, never plain text)."""
    return {tid for tid, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}


def derive_markers(processor: Any) -> TurnMarkers:
    """Read the assistant header and end-of-turn ids off the template by rendering probe conversations.

    Two conversations that differ only in the reply share the header as the token run between the
    user turn and the reply, and the end-of-turn token as the first token after the reply.
    """
    prompt, first, second = _probe(processor, None), *(_probe(processor, r) for r in _PROBE_REPLIES)
    if first[: len(prompt)] != prompt:
        raise CollateError("chat template: adding an assistant turn changes how the user turn renders")
    header = first[len(prompt) : _common_prefix(first, second)]
    tail = _common_prefix(first[::-1], second[::-1])
    end = first[len(first) - tail] if tail else None
    if not header or end not in special_ids(processor.tokenizer):
        raise CollateError(
            f"chat template: cannot find the assistant header / end-of-turn token (header ids {header}, "
            f"token after the reply {end}); a ChatML-style template with a special end token is needed"
        )
    tok = processor.tokenizer
    return TurnMarkers(tuple(header), end, tuple(sorted(_never_ids(processor, end))),
                       decode=lambda tid: tok.decode([tid], clean_up_tokenization_spaces=False))


def _never_ids(processor: Any, end: int) -> set[int]:
    """Vision placeholders and the pad token: in input_ids, never written by the model. A pad token
    that is also the end-of-turn token (pad = eos) stays allowed; the attention mask finds padding."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {getattr(processor, name, None) for name in names}
    tok = processor.tokenizer
    ids.add(tok.pad_token_id)
    ids.add(tok.added_tokens_encoder.get("<|vision_pad|>"))
    return {i for i in ids if isinstance(i, int) and i != end}


def marker_strings(tokenizer: Any) -> list[str]:
    """The special token strings, longest first (so a regex alternation prefers the longest)."""
    return sorted((tokenizer.convert_ids_to_tokens(i) for i in special_ids(tokenizer)), key=len, reverse=True)


def message_texts(sample: dict) -> list[tuple[int, str, str]]:
    """(message index, role, text) for every text piece of a sample."""
    out = []
    for index, message in enumerate(sample["messages"]):
        content = message.get("content")
        items = [{"text": content}] if isinstance(content, str) else (content or [])
        out.extend((index, message.get("role", "?"), item["text"]) for item in items if "text" in item)
    return out


def sample_text(sample: dict) -> str:
    """Every text piece of a sample, joined by newlines (the quick marker test of each sample)."""
    pieces = []
    for message in sample["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        elif content:
            pieces += [item["text"] for item in content if "text" in item]
    return "\n".join(pieces)


# ------------------------------------------------------------------------------------------------
# The collator
# ------------------------------------------------------------------------------------------------


def to_left_padding(batch: dict) -> dict:
    """Move a right-padded batch's padding to the left: one gather per per-token tensor."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    index = (torch.arange(width) - (width - mask.sum(1, keepdim=True))) % width
    return {k: v.gather(1, index) if _per_token(k, v, mask) else v for k, v in batch.items()}


def _per_token(key: str, value: Any, mask: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == mask.shape and key != "pixel_values"


class ChatCollator:
    """Sample dicts -> a batch of tensors with assistant-only labels (see the module docstring).

    ``truncation``: what happens to a sample longer than ``max_length`` whose cut would leave no
    supervised token or split an image: ``"drop"`` (counted in ``dropped``, an event when ``events``
    is given) or ``"error"`` (:class:`CollateError`). Other long samples are cut at ``max_length``.
    ``marker_text``: the same choice for samples whose text contains a special token string.
    After each call ``last_samples`` / ``last_sample_ids`` are the samples behind the batch's rows.
    """

    def __init__(self, processor: Any, *, max_length: int | None = None, truncation: str = "drop",
                 padding_side: str = "right", events: Any = None, marker_text: str = "error"):
        for name, value, allowed in (("truncation", truncation, ("drop", "error")),
                                     ("padding_side", padding_side, ("right", "left")),
                                     ("marker_text", marker_text, ("drop", "error"))):
            if value not in allowed:
                raise ValueError(f"ChatCollator: {name}={value!r}; allowed: {', '.join(allowed)}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"ChatCollator: max_length={max_length!r}; must be a positive integer or None")
        self.processor, self.max_length, self.events = processor, max_length, events
        self.truncation, self.padding_side, self.marker_text = truncation, padding_side, marker_text
        self.markers = derive_markers(processor)
        pad = processor.tokenizer.pad_token_id
        self._vision = torch.tensor([i for i in self.markers.never if i != pad], dtype=torch.long)
        markers = marker_strings(processor.tokenizer)
        self._marker_re = re.compile("|".join(map(re.escape, markers))) if markers else None
        self._marker_starts = {m[:2] for m in markers}  # substring tests skip the regex for most texts
        self.dropped = 0
        self.last_samples: list[dict] = []
        self.last_sample_ids: list[str] = []

    def __call__(self, samples: list[dict]) -> dict:
        kept = [s for s in samples if self._text_ok(s)]
        if not kept:
            raise CollateError(_nothing_left(samples))
        batch, refused = self._build(kept)
        if refused:
            for sample, reason, policy in refused:
                self._refuse(sample, reason, policy)
            kept = [s for s in kept if not any(s is r[0] for r in refused)]
            if not kept:
                raise CollateError(_nothing_left(samples, self.max_length))
            batch, _ = self._build(kept)
        if self.max_length is not None:
            batch = {k: v[:, : self.max_length] if _per_token(k, v, batch["attention_mask"]) else v
                     for k, v in batch.items()}
        if self.padding_side == "left":
            batch = to_left_padding(batch)
        self.last_samples, self.last_sample_ids = kept, [str(s.get("id", "?")) for s in kept]
        return batch

    def _build(self, samples: list[dict]) -> tuple[dict, list[tuple[dict, str, str]]]:
        """Encode right-padded, label, and list the samples that cannot be kept (with why)."""
        if not samples:
            raise CollateError("collate: no sample left in this batch (every one was dropped)")
        texts = [self.processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
        images = [image for s in samples for image in s.get("images") or []]
        batch = dict(self.processor(text=texts, images=images or None, padding=True,
                                    padding_side="right", return_tensors="pt"))
        batch["labels"], turns = label_rows(batch["input_ids"], batch["attention_mask"], self.markers)
        return batch, self._turn_problems(turns, samples) + self._cut_problems(batch, samples)

    def _turn_problems(self, turns: np.ndarray, samples: list[dict]) -> list[tuple[dict, str, str]]:
        """Every assistant message must come out as exactly one assistant header."""
        wanted = [[m.get("role") for m in s["messages"]].count("assistant") for s in samples]
        return [(s, f"{f} assistant turns found for {w} assistant messages: the template or the text "
                    "breaks the turn markers", self.marker_text)
                for s, f, w in zip(samples, turns.tolist(), wanted) if f != w]

    def _cut_problems(self, batch: dict, samples: list[dict]) -> list[tuple[dict, str, str]]:
        """Samples that a cut at max_length would leave unsupervised or with a split image."""
        if self.max_length is None:
            return []
        cut, lengths = self.max_length, batch["attention_mask"].sum(1)
        if int(lengths.max()) <= cut:
            return []
        supervised = (batch["labels"][:, :cut] != IGNORE_INDEX).sum(1).tolist()
        split = torch.isin(batch["input_ids"][:, cut:], self._vision).any(1).tolist()
        problems = []
        for s, n, sup, vis in zip(samples, lengths.tolist(), supervised, split):
            if n > cut and (sup == 0 or vis):
                why = "no supervised token would be left" if sup == 0 else "an image would be cut"
                problems.append((s, f"{n} tokens > max_length {cut}: {why}", self.truncation))
        return problems

    def _text_ok(self, sample: dict) -> bool:
        if self._marker_re is None:
            return True
        joined = sample_text(sample)  # one substring test per marker start clears most samples
        if not any(start in joined for start in self._marker_starts):
            return True
        for index, role, text in message_texts(sample):
            found = self._marker_re.search(text)
            if found:
                reason = (f"message {index} ({role}) contains the special token {found.group()!r}, which the "
                          "tokenizer would read as a template marker; escape or remove it")
                return self._refuse(sample, reason, self.marker_text)
        return True

    def _refuse(self, sample: dict, reason: str, policy: str) -> bool:
        message = f"sample {sample.get('id', '?')}: {reason}"
        if policy == "error":
            raise CollateError(message)
        self.dropped += 1
        if self.events is not None:
            self.events.record("collate", "drop", message, sample=sample.get("id"))
        return False


def _nothing_left(samples: list[dict], max_length: int | None = None) -> str:
    """Every sample of a micro-batch was dropped: the Trainer cannot take an empty batch."""
    ids = ", ".join(str(s.get("id", "?")) for s in samples)
    hint = f"raise data.max_length (now {max_length}) or shorten them" if max_length else "fix or remove them"
    return f"collate: every sample of this micro-batch was dropped ({ids}); see events.jsonl for why; {hint}"
