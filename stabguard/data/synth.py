"""Synthetic PCB inspection data in the same JSONL format as real data, so demos and tests use one path.

Boards come from :mod:`stabguard.data.pcb` (layout) and :mod:`stabguard.data.defects` (defects);
this module turns each board into a conversation and writes the set: images, train/val JSONL, the
ground truth and a README. Board ``i`` uses ``numpy.random.default_rng([seed, i])`` for its pixels
first and its conversation after: same seed, same bytes.

Every row holds exactly one *detection* answer (``answer``: a count, then the boxes as JSON), the
format ``stabguard eval`` parses. The first user turn asks one of four things -- where the defects
are, whether there is one, how many, which types -- and a row that did not ask "where" first asks it
in a follow-up, so multi-turn masking is exercised and every row still teaches the detection format.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from stabguard.data.jsonl import write_atomic, write_jsonl
from stabguard.data.pcb import DEFECT_CLASSES, Board, make_board
from stabguard.data.workers import map_in_order
from stabguard.progress import ProgressFn

__all__ = ["DEFECT_CLASSES", "Board", "make_board", "answer", "conversation", "synth_pcb"]

SYSTEM_PROMPTS = (
    "You are an automated optical inspection assistant for printed circuit boards.",
    "You inspect binarised PCB images (white copper on black) and report manufacturing defects.",
)
INSTRUCTIONS = (
    "Inspect this PCB crop for defects. Report each one as JSON with bbox_2d and label.",
    "Find every defect on this board (open, short, mousebite, spur, spurious copper, pin-hole). "
    "Give boxes in pixel coordinates.",
    "Are there any manufacturing defects in this image? List them with bounding boxes.",
    'Check this circuit board. Output each defect as {"bbox_2d": [x1, y1, x2, y2], "label": "..."}.',
    "Locate the defects on this PCB image.",
    "Quality check: is anything wrong with this board? Answer with boxes and defect types.",
)
QUESTIONS = {  # first-turn questions that are not "where": whether, how many, which types
    "presence": ("Is there any defect on this board?", "Does this PCB crop have a manufacturing defect?"),
    "count": ("How many defects does this board have?", "Count the defects on this PCB crop."),
    "types": ("Which defect types are on this board?", "What kinds of defects do you see on this PCB?"),
}
WHERE_FOLLOW_UP = "Now list each defect as JSON with bbox_2d and label."
EXPLAIN = {
    "open": "the trace is cut through, so the circuit is open",
    "short": "a copper bridge joins two conductors that should be separate",
    "mousebite": "bites are missing from the edge of the trace",
    "spur": "a spike of copper sticks out from the trace edge",
    "spurious copper": "an isolated piece of copper belongs to no conductor",
    "pin-hole": "a small hole goes through the copper",
}


def _count(k: int) -> str:
    return f"{k} defect" if k == 1 else f"{k} defects"


def answer(defects: list[dict]) -> str:
    """The detection answer: a count, then the boxes as a JSON list (what ``stabguard eval`` parses)."""
    if not defects:
        return "No defects found."
    return f"Found {_count(len(defects))}:\n" + json.dumps(defects)


def short_answer(style: str, defects: list[dict]) -> str:
    """Reply to a presence, count or types question."""
    k = len(defects)
    if style == "presence":
        return f"Yes: {_count(k)}." if k else "No defects found."
    if style == "count":
        return f"{_count(k).capitalize()}." if k else "0 defects: the board is clean."
    kinds = sorted({d["label"] for d in defects}, key=DEFECT_CLASSES.index)
    return "Defect types: " + ", ".join(kinds) + "." if kinds else "None: no defects found."


def _follow_up(rng: np.random.Generator, defects: list[dict]) -> list[dict]:
    """A second question after the detection answer: the type at one box, or a yes/no when clean."""
    if defects:
        d = defects[int(rng.integers(len(defects)))]
        return [{"role": "user", "content": f"What kind of defect is at {d['bbox_2d']}?"},
                {"role": "assistant", "content": f"It is a {d['label']}: {EXPLAIN[d['label']]}."}]
    return [{"role": "user", "content": "Is any trace broken or bridged?"},
            {"role": "assistant", "content": "No. Every trace is continuous and no copper bridges separate conductors."}]


def conversation(rng: np.random.Generator, image: str, defects: list[dict]) -> list[dict]:
    """One row's messages: about 60% ask "where" first (a third of those get a follow-up); the rest ask
    whether / how many / which types first and "where" second."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    style = "where" if rng.random() < 0.6 else pick(tuple(QUESTIONS))
    text = {"type": "text", "text": pick(INSTRUCTIONS if style == "where" else QUESTIONS[style])}
    content = [{"type": "image", "image": image}, text]
    messages = [{"role": "system", "content": pick(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": content[::-1] if rng.random() < 0.2 else content})
    if style != "where":
        messages += [{"role": "assistant", "content": short_answer(style, defects)},
                     {"role": "user", "content": WHERE_FOLLOW_UP}]
    messages.append({"role": "assistant", "content": answer(defects)})
    if style == "where" and rng.random() < 0.35:
        messages += _follow_up(rng, defects)
    return messages


# ---------------------------------------------------------------- files


def _split(n: int, seed: int, val_fraction: float) -> set[int]:
    """Board indices for validation: at least one when asked for and there are two boards or more."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def readme(n: int, seed: int, size: int, val_fraction: float, rows: dict, counts: dict) -> str:
    """A short README for a generated set: what it is, its format, and the command that remakes it."""
    per_class = "\n".join(f"| {label} | {count} |" for label, count in counts.items())
    return f"""# Synthetic PCB defect set

Made by `stabguard data synth-pcb --out DIR --n {n} --seed {seed} --size {size} --val-fraction {val_fraction}`;
the same command writes the same bytes. DeepPCB-style crops: {size}x{size} binarised images, white copper on
black, 0-3 defects each, of six classes (open, short, mousebite, spur, spurious copper, pin-hole).

- `images/board_NNNN.png`: the boards.
- `train.jsonl` ({len(rows["train"])} rows), `val.jsonl` ({len(rows["val"])} rows): one conversation per board
  (`messages`; image paths relative to this folder), plus the ground truth (`defects`) and the board index.
- `annotations.json`: every board's split and defects.

Boxes are `{{"bbox_2d": [x1, y1, x2, y2], "label": ...}}` in absolute pixels of the image (x2, y2
exclusive). Each row has one detection answer, `Found k defects:` then the JSON list, or
`No defects found.`; `stabguard eval` scores generated answers in that format against `defects`.

| class | boxes |
|---|---|
{per_class}
"""


def make_row(out: Path, seed: int, size: int, i: int) -> dict:
    """Board ``i``: its image written under ``out``, its conversation and defects returned. Everything
    comes from ``default_rng([seed, i])``, so any worker process makes the same bytes."""
    rng = np.random.default_rng([seed, i])
    board, image = make_board(rng, size), f"images/board_{i:04d}.png"
    Image.fromarray(board.image).save(out / image)
    return {"image": image, "messages": conversation(rng, image, board.defects), "defects": board.defects}


def synth_pcb(out_dir: str | Path, n: int, seed: int = 0, size: int = 256, val_fraction: float = 0.25, *,
              workers: int = 1, progress: ProgressFn | None = None) -> dict:
    """Write ``n`` boards: images/*.png, train.jsonl, val.jsonl (if any), annotations.json, README.md.

    Board ``i`` depends only on ``(seed, i)``, so a larger ``n`` adds boards without changing the
    first ones, and ``workers`` processes write the same bytes as one. The JSONL files are written
    last and atomically: an interrupted call leaves images but no partial (or replaced) JSONL.
    Returns what was written: paths, row counts and defects per class.
    """
    if n < 1 or size < 64 or not 0 <= val_fraction < 1:
        raise ValueError(f"synth_pcb: need n >= 1, size >= 64, 0 <= val_fraction < 1; got n={n}, "
                         f"size={size}, val_fraction={val_fraction}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    made = map_in_order(partial(make_row, out, seed, size), range(n), workers=workers, what="boards generated",
                        progress=progress)
    val, rows, boards = _split(n, seed, val_fraction), {"train": [], "val": []}, []
    for i, row in enumerate(made):
        split = "val" if i in val else "train"
        rows[split].append({"messages": row["messages"], "defects": row["defects"], "board": i})
        boards.append({"image": row["image"], "split": split, "defects": row["defects"]})
    counts = {c: sum(d["label"] == c for b in boards for d in b["defects"]) for c in DEFECT_CLASSES}
    _write_set(out, rows, {"source": "stabguard synth_pcb", "seed": seed, "size": size,
                           "classes": list(DEFECT_CLASSES), "boards": boards},
               readme(n, seed, size, val_fraction, rows, counts))
    return {"out_dir": str(out), "images": n, "train": str(out / "train.jsonl"),
            "val": str(out / "val.jsonl") if rows["val"] else None, "annotations": str(out / "annotations.json"),
            "readme": str(out / "README.md"), "train_rows": len(rows["train"]), "val_rows": len(rows["val"]),
            "defects": counts}


def _write_set(out: Path, rows: dict, notes: dict, text: str) -> None:
    write_jsonl(out / "train.jsonl", rows["train"])
    if rows["val"]:
        write_jsonl(out / "val.jsonl", rows["val"])
    write_atomic(out / "annotations.json", json.dumps(notes, indent=1) + "\n")
    write_atomic(out / "README.md", text)
