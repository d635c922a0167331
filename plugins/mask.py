"""mask: audits the labels of every batch before the loss sees them.

A wrong label mask trains silently on the wrong tokens (the prompt, the image pads, the padding) or on
nothing at all (0/0 = NaN). Per sample it checks: something is supervised; no padding, vision or pad
token is; labels equal the input ids where set (labels are shifted inside the model, not before); the
supervised share is inside [min_share, max_share]; and in strict mode the supervised tokens are exactly
the assistant replies plus their end-of-turn token (the newline after it may be supervised too, as Qwen's
own fine-tuning code does), re-derived here independently of the collator (the
header from the template's generation prompt, replies as spans to the next end token). The first batch
is decoded into the event log as "what the loss sees". It is collated before step 1, so the error policy
stops a run before any update; ``markers`` audits, in ``setup_model``, the tokens a hand-written
collator searches for. Strict mode assumes replies render verbatim after the generation prompt (true
for Qwen3-VL Instruct; a template that adds ``<think>`` to its prompt needs ``strict = false``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from stabguard import IGNORE_INDEX, GuardError, GuardOptions, hookimpl

NAME = "mask"
_VISION = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_QWEN_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class Options(GuardOptions):
    policy: Literal["error", "skip_sample", "warn"] = Field(
        "error", description="a sample with a label problem: stop the run (error), set its labels to -100 "
        "(skip_sample), or alert (warn)")
    min_share: float = Field(0.0, ge=0.0, le=1.0, description="lowest supervised share of a sample's tokens")
    max_share: float = Field(0.99, ge=0.0, le=1.0, description="highest share; 1.0 means nothing is masked")
    strict: bool = Field(True, description="compare labels with assistant spans re-derived from the template")
    decode_first_batch: bool = Field(True, description="write the first batch, decoded, into the event log")
    markers: list[str] = Field(default_factory=list, description="tokens your own collator looks up")

    @model_validator(mode="after")
    def _ordered(self) -> Options:
        if self.min_share > self.max_share:
            raise ValueError(f"min_share {self.min_share} is above max_share {self.max_share}")
        return self


def check_marker(tokenizer: Any, marker: str) -> int:
    """The id of ``marker`` if it is one token that text encoding produces; GuardError otherwise."""
    tid = tokenizer.convert_tokens_to_ids(marker)
    pieces = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if tid is not None and pieces == [tid] and (tid != tokenizer.unk_token_id or marker == tokenizer.unk_token):
        return tid
    if tid is None:
        lookup = "None (no unk token): comparing input_ids with it is always False"
    else:
        also = " and the pad token" if tid == tokenizer.pad_token_id else ""
        lookup = f"{tid}, the unk token {tokenizer.convert_ids_to_tokens(tid)!r}{also}: a search finds padding"
    raise GuardError(f"mask: marker {marker!r} is not a token of this tokenizer: text encodes it as "
                     f"{len(pieces)} tokens {tokenizer.convert_ids_to_tokens(pieces)} {pieces}; "
                     f"convert_tokens_to_ids gives {lookup}")


class TemplateIds:
    """What the guard reads off the processor: the assistant header is the template's generation prompt,
    the end-of-turn token is the special token that closes a user turn. A bare tokenizer (what TRL and
    the frameworks pass as ``processing_class`` for text models) serves as its own processor."""

    def __init__(self, processor: Any):
        self.tokenizer = tok = getattr(processor, "tokenizer", processor)
        user = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
        render = lambda **kw: tok(processor.apply_chat_template(user, tokenize=False, **kw))["input_ids"]
        bare, prompt = render(), render(add_generation_prompt=True)
        specials = {i for i, t in tok.added_tokens_decoder.items() if t.special}
        self.header = np.array(prompt[len(bare):])
        closing = [i for i in bare if i in specials]
        if prompt[: len(bare)] != bare or not len(self.header) or not closing:
            raise GuardError("mask: cannot read the assistant header and end-of-turn token off the chat template")
        self.end = closing[-1]
        after = bare[len(bare) - bare[::-1].index(self.end):]  # what the template writes after a turn's end
        self.after_end = after[0] if after else -1
        forbidden = {getattr(processor, name, None) for name in _VISION} | {tok.pad_token_id}
        forbidden |= {tok.added_tokens_encoder.get(name) for name in _QWEN_VISION_TOKENS}  # a bare tokenizer too
        # pad = eos setups: the end token stays allowed; the attention mask finds padding
        self.forbidden = np.array(sorted(i for i in forbidden if isinstance(i, int) and i != self.end))
        self._tail = tok.decode([int(self.header[-1])])  # decoded once: merged() runs on every batch
        self._merges: dict[int, bool] = {}
        self._table = np.zeros(max([len(tok), *(self.forbidden + 1)]), dtype=bool)
        self._table[self.forbidden] = True

    def is_forbidden(self, ids: np.ndarray) -> np.ndarray:
        """Lookup table over the vocabulary (cheaper than isin on every batch)."""
        try:
            return self._table[ids]
        except IndexError:  # ids past the tokenizer: a foreign collator
            return np.isin(ids, self.forbidden)

    def merged(self, ids: np.ndarray) -> np.ndarray:
        """Tokens that hold the header's last token merged with the reply's first characters."""
        for tid in set(ids.tolist()) - self._merges.keys():
            text = self.tokenizer.decode([tid])
            self._merges[tid] = len(text) > len(self._tail) and text.startswith(self._tail)
        return np.array([self._merges[tid] for tid in ids.tolist()], dtype=bool)


def expected_supervision(input_ids: Any, attention_mask: Any, t: TemplateIds) -> np.ndarray:
    """Bool (B, L): assistant reply tokens and each reply's end token, as spans.

    Every turn opens with the header's first token; a turn whose opening matches the header is an
    assistant turn, and its reply runs from after the header to the first end-of-turn token after it
    (searchsorted over the end positions), or to the end of the row when it was cut. NumPy: on CPU
    batches this size its per-op cost is about half of torch's.
    """
    ids = _host(input_ids)
    n, (rows, width) = len(t.header), ids.shape
    row, at = np.nonzero(ids == t.header[0])
    follow = at[:, None] + np.arange(n)
    heads = np.where(follow < width, ids[row[:, None], np.minimum(follow, width - 1)], -1)
    offset = np.where((heads == t.header).all(1), n, -1)
    if n > 1:
        loose = np.flatnonzero((heads[:, :-1] == t.header[:-1]).all(1) & (offset < 0) & (heads[:, -1] >= 0))
        if loose.size:
            offset[loose[t.merged(heads[loose, -1])]] = n - 1
    reply = (offset >= 0) & (at + offset < width)
    stride = width + 1  # one spare column per row takes the -1 of a reply that runs to the row's end
    first = (row * stride + at + offset)[reply]
    end_row, end_col = np.nonzero(ids == t.end)
    ends = np.append(end_row * stride + end_col, rows * stride)
    last = np.minimum(ends[np.searchsorted(ends, first)], row[reply] * stride + width - 1)
    delta = np.zeros(rows * stride, dtype=np.int16)
    delta[first] = 1  # starts never coincide with stops: a header lies between them
    delta[last + 1] = -1
    spans = np.cumsum(delta.reshape(rows, stride), axis=1, dtype=np.int16)[:, :width] > 0
    spans &= _host(attention_mask).astype(bool)
    spans &= ~t.is_forbidden(ids)
    return spans


def optional_supervision(input_ids: Any, spans: np.ndarray, t: TemplateIds) -> np.ndarray:
    """Bool (B, L): the token the template writes right after a reply's end token ("\n" for Qwen). Either
    way is right: Qwen3-VL's own fine-tuning code and ms-swift supervise it, stabguard's collator does not."""
    ids = _host(input_ids)
    closed = np.zeros_like(spans)
    closed[:, 1:] = spans[:, :-1] & (ids[:, :-1] == t.end)
    return closed & (ids == t.after_end)


class MaskGuard:
    def __init__(self, options: Options, processor: Any = None):
        self.options = options
        self.ids: TemplateIds | None = None
        self.batches = 0
        if processor is not None:
            self.bind(processor)

    def bind(self, processor: Any) -> MaskGuard:
        """Read the token ids the checks need (also done by ``setup_model`` in a run)."""
        self.ids = TemplateIds(processor)
        for marker in self.options.markers:
            check_marker(self.ids.tokenizer, marker)
        return self

    @hookimpl
    def setup_model(self, processor, events):
        self.bind(processor)
        events.record(NAME, "info", f"assistant header ids {self.ids.header.tolist()}, end id {self.ids.end}")

    @hookimpl
    def post_collate(self, batch, samples, events):
        if "labels" not in batch:
            raise GuardError(f"mask: the batch has no 'labels' (keys: {', '.join(batch)}): nothing is trained")
        names = _sample_names(samples, batch["labels"].shape[0])
        if self.batches == 0 and self.options.decode_first_batch and self.ids is not None:
            self._decode(batch, names, events)
        self.batches += 1
        problems = self._problems(batch)
        if problems:
            self._apply(problems, batch, names, events)

    def _problems(self, batch: dict) -> dict[int, list[str]]:
        """Row -> what is wrong. Strict mode first compares whole rows with the expected labels (a few
        array ops); only a batch with a differing row pays for the itemised checks."""
        if self.ids is None or not self.options.strict:
            return self._itemised(batch)
        labels, input_ids, mask = (_host(batch[k]) for k in ("labels", "input_ids", "attention_mask"))
        want = expected_supervision(input_ids, mask, self.ids)
        either = optional_supervision(input_ids, want, self.ids) & (labels == input_ids)
        same = ((labels == np.where(want, input_ids, IGNORE_INDEX)) | either).all(1)
        lo, hi = self.options.min_share, self.options.max_share
        for ok, n_sup, real in zip(same.tolist(), want.sum(1).tolist(), mask.sum(1).tolist()):
            if not ok or n_sup == 0 or not lo <= n_sup / max(real, 1) <= hi:
                return self._itemised(batch)
        return {}

    def _itemised(self, batch: dict) -> dict[int, list[str]]:
        """Row -> every problem found. All per-row counts come to the host in one transfer."""
        labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"].bool()
        sup = labels != IGNORE_INDEX
        counts = [sup.sum(1), mask.sum(1), (sup & ~mask).sum(1), (sup & (labels != input_ids)).sum(1)]
        bad_ids = extra = missing = None
        if self.ids is not None:
            bad_ids = sup & torch.from_numpy(self.ids.is_forbidden(_host(input_ids))).to(sup.device)
            counts.append(bad_ids.sum(1))
        if self.ids is not None and self.options.strict:
            spans = expected_supervision(input_ids, mask, self.ids)
            want = torch.from_numpy(spans).to(sup.device)
            either = torch.from_numpy(optional_supervision(input_ids, spans, self.ids)).to(sup.device)
            extra, missing = sup & ~want & ~either, want & ~sup
            counts += [extra.sum(1), missing.sum(1)]
        table = torch.stack(counts, 1).tolist()
        problems = {row: self._describe(row, c, input_ids, bad_ids, extra, missing) for row, c in enumerate(table)}
        return {row: what for row, what in problems.items() if what}

    def _describe(self, row, counts, input_ids, bad_ids, extra, missing) -> list[str]:
        n_sup, real, pad_sup, differ, *token_counts = counts
        lo, hi, what = self.options.min_share, self.options.max_share, []
        if n_sup == 0:
            what.append("no supervised token (every label is -100)")
        if pad_sup:
            what.append(f"{pad_sup} padding positions (attention_mask 0) supervised")
        if differ:
            what.append(f"{differ} labels differ from input_ids (shifted before the model shifts them?)")
        if n_sup and not lo <= n_sup / max(real, 1) <= hi:
            what.append(f"supervised share {n_sup / max(real, 1):.3f} outside [{lo}, {hi}]")
        if token_counts and token_counts[0]:
            what.append(f"{token_counts[0]} vision/padding tokens supervised ({self._names(input_ids[row][bad_ids[row]])})")
        if len(token_counts) == 3 and any(token_counts[1:]):
            parts = [f"{n} {label} (first: {self._text(input_ids[row][where[row]])!r})"
                     for n, label, where in zip(token_counts[1:], ("tokens supervised outside them",
                                                                   "reply tokens left out"), (extra, missing)) if n]
            what.append("labels are not the assistant replies: " + ", ".join(parts))
        return what

    def _names(self, ids: torch.Tensor) -> str:
        values, counts = ids.unique(return_counts=True)
        tokens = self.ids.tokenizer.convert_ids_to_tokens(values.tolist())
        return ", ".join(f"{t} x{c}" for t, c in zip(tokens, counts.tolist()))

    def _text(self, ids: torch.Tensor) -> str:
        return self.ids.tokenizer.decode(ids[:12].tolist(), clean_up_tokenization_spaces=False)

    def _apply(self, problems: dict[int, list[str]], batch: dict, names: list[str], events: Any) -> None:
        lines = [f"sample {names[row]}: {'; '.join(what)}" for row, what in problems.items()]
        if not (batch["labels"] != IGNORE_INDEX).any():
            lines.insert(0, "every label in the batch is -100: the loss would be 0/0 = NaN")
        for row, line in zip(problems, lines[-len(problems):]):
            events.record(NAME, "finding", line, sample=names[row], policy=self.options.policy)
        if self.options.policy == "error":
            raise GuardError("mask: " + " | ".join(lines))
        if self.options.policy == "skip_sample":
            batch["labels"][list(problems)] = IGNORE_INDEX
            for row in problems:
                events.record(NAME, "skip", f"sample {names[row]}: labels set to -100", sample=names[row])
            if (batch["labels"] != IGNORE_INDEX).any():
                return
            lines.insert(0, "every sample of the batch skipped: its loss is 0/0 = NaN")
        events.alert(NAME, f"label problems in {len(problems)} sample(s): " + " | ".join(lines)[:2000])

    def _decode(self, batch: dict, names: list[str], events: Any) -> None:
        """Record, per sample, the supervised text: exactly what the loss will be computed on."""
        tok = self.ids.tokenizer
        for name, labels in zip(names, batch["labels"]):
            spans = [tok.decode(run, clean_up_tokenization_spaces=False) for run in _runs(labels)]
            preview = " | ".join(spans)[:300] or "(nothing)"
            events.record(NAME, "info", f"what the loss sees, sample {name}: {preview}", sample=name,
                          supervised_tokens=sum(map(len, _runs(labels))), spans=spans)


def _host(values: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only for a tensor on an accelerator)."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous supervised runs of one row (one per assistant turn in a correct mask)."""
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    if not len(pos):
        return []
    breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
    return [labels[chunk].tolist() for chunk in torch.tensor_split(pos, breaks.tolist())]


def _sample_names(samples: list[dict], rows: int) -> list[str]:
    """Sample ids by row; rows are named by index when the samples do not line up with the batch."""
    if samples is not None and len(samples) == rows:
        return [str(s.get("id", f"row {i}")) for i, s in enumerate(samples)]
    return [f"row {i}" for i in range(rows)]


@hookimpl
def register_guards(register):
    register(NAME, Options, MaskGuard)
