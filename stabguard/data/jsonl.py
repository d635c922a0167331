"""JSONL conversation datasets: every row checked when the file is opened, images decoded on access.

A bad row found after hours of training costs hours; found at construction it costs seconds. So the
whole file is parsed up front and every problem is reported at once, each as
``path:line: key: message: value`` — enough to open the file at the right line and fix it.
Images are only checked for existence up front (decoding them all would be slow on a large set);
``check_images`` decodes a sample, and ``__getitem__`` names the sample and the file if one is corrupt.

``policy="skip"`` keeps going instead: each bad row (or undecodable image, found on access) is left
out, counted in ``skipped``, and recorded as a ``data``/``skipped_row`` event naming file:line and why.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from stabguard.progress import ProgressFn

ROLES = ("system", "user", "assistant")
_DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)


class DataError(ValueError):
    """A dataset problem a person must fix in the data; the message names file, line, key and value."""


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- row schema


def _check_item(item: Any, key: str, base: Path) -> Iterator[str]:
    """One content item: a text item or an image item whose file exists."""
    if not isinstance(item, dict):
        yield f"{key}: must be an object with a 'type', got {_short(item)}"
        return
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            yield f"{key}.text: must be a string, got {_short(item.get('text'))}"
        elif not item["text"].strip():
            yield f"{key}.text: empty text"
    elif kind == "image":
        yield from _check_image_ref(item.get("image"), f"{key}.image", base)
    else:
        yield f"{key}.type: must be 'text' or 'image', got {_short(kind)}"


def _leaves(base: Path, ref: str) -> bool:
    """Whether ``ref`` points outside ``base`` (absolute, or ``..`` past it). Lexical, so a symlinked
    image folder inside the dataset still counts as inside."""
    joined = os.path.normpath(os.path.join(base, ref))
    return os.path.isabs(ref) or os.path.commonpath([os.path.normpath(base), joined]) != os.path.normpath(base)


def _check_image_ref(ref: Any, key: str, base: Path) -> Iterator[str]:
    if not isinstance(ref, str) or not ref:
        yield f"{key}: must be a non-empty path string, got {_short(ref)}"
    elif "://" in ref:
        yield f"{key}: only local files are supported, got URL: {_short(ref)}"
    elif _leaves(base, ref):
        yield f"{key}: image path leaves the dataset directory {base}: {ref}"
    elif not (base / ref).is_file():
        yield f"{key}: file not found: {ref}"
    elif (base / ref).stat().st_size == 0:
        yield f"{key}: empty file (0 bytes): {ref}"


def _check_content(content: Any, key: str, base: Path) -> Iterator[str]:
    if isinstance(content, str):
        if not content.strip():
            yield f"{key}: empty text"
        return
    if not isinstance(content, list):
        yield f"{key}: must be a string or a list of items, got {_short(content)}"
    elif not content:
        yield f"{key}: must not be an empty list"
    else:
        for j, item in enumerate(content):
            yield from _check_item(item, f"{key}[{j}]", base)


def _check_message(msg: Any, i: int, base: Path) -> Iterator[str]:
    key = f"messages[{i}]"
    if not isinstance(msg, dict):
        yield f"{key}: must be an object with 'role' and 'content', got {_short(msg)}"
        return
    role = msg.get("role")
    if role not in ROLES:
        yield f"{key}.role: must be one of {', '.join(ROLES)}; got {_short(role)}"
    elif role == "system" and i != 0:
        yield f"{key}.role: a system turn may only come first, got system at position {i}"
    if "content" not in msg:
        yield f"{key}.content: missing"
    else:
        yield from _check_content(msg["content"], f"{key}.content", base)


def row_problems(row: Any, base: Path) -> list[str]:
    """Problems of one parsed row, each as ``key: message``; image paths resolve against ``base``."""
    if not isinstance(row, dict):
        return [f"row: must be a JSON object, got {_short(row)}"]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return [f"messages: must be a non-empty list, got {_short(messages)}"]
    problems = [p for i, m in enumerate(messages) for p in _check_message(m, i, base)]
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("messages: no assistant turn, so nothing would be learned from this row")
    return problems


# ---------------------------------------------------------------- reading files


PROGRESS_EVERY = 500  # rows between progress reports: often enough to see, rare enough to cost nothing


def missing_file(path: str | Path) -> str:
    """A data file that is not there, with the commands that make one (the usual first stumble on a fresh
    clone); ``validate``, ``check`` and ``run`` all say it in these words."""
    out = Path(path).parent
    return (f"{path}: file not found; make it first: stabguard data synth-pcb --out {out} --n 2000 --size 640 "
            f"(synthetic, minutes), or: stabguard data import-deeppcb --src PATH/TO/DeepPCB/PCBData --out {out}")


def _line_count(path: Path, limit: int | None) -> int:
    with path.open("rb") as f:  # bytes: a fast pass, no decoding
        total = sum(1 for _ in f)
    return total if limit is None else min(total, limit)


def _parse(path: Path, limit: int | None, progress: ProgressFn | None = None,
           what: str = "rows checked") -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) for every valid row, and ``path:line: ...`` for every problem;
    ``progress(what, lines done, lines)`` every PROGRESS_EVERY lines and at the end."""
    if not path.is_file():
        return [], [missing_file(path)]
    total = _line_count(path, limit) if progress else 0
    rows, problems = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and lineno > limit:
                break
            _parse_line(path, lineno, line, rows, problems)
            if progress and lineno % PROGRESS_EVERY == 0:
                progress(what, lineno, total)
    if progress:
        progress(what, total, total)
    if not rows and not problems:
        problems.append(f"{path}: no rows")
    return rows, problems


def _parse_line(path: Path, lineno: int, line: str, rows: list, problems: list[str]) -> None:
    if not line.strip():
        return  # blank lines (a trailing newline, say) are not rows
    try:
        row = json.loads(line.rstrip())  # so an error column points into this line
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
        return
    found = row_problems(row, path.parent)
    problems += [f"{path}:{lineno}: {p}" for p in found]
    if not found:
        rows.append((lineno, row))


def check_rows(path: str | Path, limit: int | None = None, progress: ProgressFn | None = None) -> list[str]:
    """Every schema problem in the first ``limit`` lines (all when None), without raising."""
    return _parse(Path(path), limit, progress)[1]


def image_refs(messages: list[dict]) -> list[str]:
    """Image paths in order of appearance, as written in the row."""
    return [
        item["image"]
        for m in messages
        if isinstance(m.get("content"), list)
        for item in m["content"]
        if item.get("type") == "image"
    ]


def load_image(path: Path, sample_id: str, ref: str) -> Image.Image:
    """Decode fully to RGB now, so a truncated or fake file fails here and not inside the processor."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise DataError(f"{sample_id}: image {ref} ({path}) cannot be decoded: {type(e).__name__}: {e}") from e


def check_images(path: str | Path, sample: int | None = 32, seed: int = 0,
                 progress: ProgressFn | None = None) -> list[str]:
    """Decode ``sample`` distinct images (all when None), chosen by ``seed``; return the failures."""
    path = Path(path)
    rows, _ = _parse(path, None, progress, "rows scanned for images")
    refs = {}
    for lineno, row in rows:
        for ref in image_refs(row["messages"]):
            refs.setdefault(ref, f"{path}:{lineno}")
    chosen = sorted(refs)
    if sample is not None and sample < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, sample))
    problems = []
    for done, ref in enumerate(chosen, start=1):
        try:
            load_image(path.parent / ref, refs[ref], ref)
        except DataError as e:
            problems.append(str(e))
        if progress:
            progress("images decoded", done, len(chosen))
    return problems


def _raise_problems(path: Path, problems: list[str], max_errors: int | None) -> None:
    shown = problems if max_errors is None else problems[:max_errors]
    lines = [f"{len(problems)} problem(s) in {path}:"] + [f"  {p}" for p in shown]
    if len(shown) < len(problems):
        lines.append(f"  ... and {len(problems) - len(shown)} more (raise max_errors to see them)")
    raise DataError("\n".join(lines))


class ConversationDataset(torch.utils.data.Dataset):
    """Conversations from a JSONL file; item ``i`` is the contract's sample dict.

    ``policy="error"`` (default): construction raises one ``DataError`` listing every schema problem
    (at most ``max_errors`` of them), and an image that cannot be decoded raises on access, naming the
    sample. ``policy="skip"``: bad rows are left out and an undecodable image makes ``__getitem__``
    serve the next good row instead; each skip is in ``skipped`` (``path:line: reason``) and, with
    ``events``, a ``data``/``skipped_row`` event. Extra top-level keys of a row (ground truth, say)
    are kept in ``rows`` but not put in the sample, so the collator sees ``id``, ``messages``, ``images``.
    ``progress(what, done, total)`` (see :mod:`stabguard.progress`) follows the reading of a large file.
    ``text_only_image``: a sample without images gets :func:`placeholder_image` before its first user
    text (recipe ``data.text_only_image``: every rank then runs the vision tower at every step).
    """

    def __init__(self, path: str | Path, max_errors: int | None = 50, policy: str = "error", events: Any = None,
                 progress: ProgressFn | None = None, text_only_image: bool = False):
        if policy not in ("error", "skip"):
            raise ValueError(f"ConversationDataset: policy={policy!r}; allowed: error, skip")
        self.path, self.policy, self.events = Path(path), policy, events
        self.text_only_image = text_only_image
        self.rows, problems = _parse(self.path, None, progress, "rows loaded")
        self.skipped: list[str] = []
        self._bad: set[int] = set()
        if not self.path.is_file():
            raise DataError(missing_file(self.path))
        if problems and (policy == "error" or not self.rows):
            _raise_problems(self.path, problems, max_errors)
        by_row: dict[str, list[str]] = {}  # one skip per row, with every reason it has
        for problem in problems:
            sample, reason = problem.split(": ", 1)
            by_row.setdefault(sample, []).append(reason)
        for sample, reasons in by_row.items():
            self._skip(f"{sample}: {'; '.join(reasons)}")

    def _skip(self, problem: str) -> None:
        self.skipped.append(problem)
        if self.events is not None:
            sample = problem.split(": ", 1)[0]
            self.events.record("data", "skipped_row", problem, sample=sample, policy=self.policy)

    def summary(self) -> str:
        """One line for the end of a run: how many rows were skipped, and where the reasons are."""
        return f"{self.path}: {len(self.skipped)} row(s) skipped (policy skip); each one is a data/skipped_row event"

    def __len__(self) -> int:
        return len(self.rows)

    def sample_id(self, i: int) -> str:
        return f"{self.path}:{self.rows[i][0]}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        for offset in range(len(self.rows)):
            j = (i + offset) % len(self.rows)
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except DataError as exc:
                if self.policy == "error":
                    raise
                self._bad.add(j)
                self._skip(str(exc))
        raise DataError(f"{self.path}: no row left whose images decode ({len(self.skipped)} skipped)")

    def _load(self, i: int) -> dict[str, Any]:
        lineno, row = self.rows[i]
        sample_id = f"{self.path}:{lineno}"
        messages = copy.deepcopy(row["messages"])  # a collator that edits messages must not edit ours
        images = [load_image(self.path.parent / ref, sample_id, ref) for ref in image_refs(messages)]
        if not images and self.text_only_image and (placed := with_placeholder_image(messages)) is not None:
            messages, images = placed, [placeholder_image()]
        return {"id": sample_id, "messages": messages, "images": images}


PLACEHOLDER_REF = "stabguard:placeholder"  # the image entry a text-only sample gets; not a file


def placeholder_image() -> Image.Image:
    """A small mid-grey image: the processor scales it to its minimum size (a few vision tokens)."""
    return Image.new("RGB", (64, 64), (128, 128, 128))


def with_placeholder_image(messages: list[dict]) -> list[dict] | None:
    """``messages`` with an image entry before the first user message's content (never supervised: it is
    in a user turn); None without a user message."""
    out = copy.deepcopy(messages)
    for message in out:
        if message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            message["content"] = [{"type": "image", "image": PLACEHOLDER_REF}, *text]
            return out
    return None


# ---------------------------------------------------------------- writing files


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader, or a
    command interrupted half-way, sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically (:func:`write_atomic`)."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
