"""Import DeepPCB-style folders (images plus ``x1 y1 x2 y2 type`` annotation files) as JSONL conversations.

DeepPCB (github.com/tangsanli5201/DeepPCB) keeps ``groupN/N/<id>_test.jpg`` (and the defect-free
``<id>_temp.jpg``) beside ``groupN/N_not/<id>.txt``, one defect per line as ``x1,y1,x2,y2,type`` with
types 1-6 = open, short, mousebite, spur, spurious copper, pin-hole; ``trainval.txt`` / ``test.txt``
list the official split. This reader also takes spaces instead of commas, class names instead of
numbers, and an image beside its annotation file, so other sets in the same spirit import too.

The output is exactly what ``synth_pcb`` writes (images copied into ``images/``, ``train.jsonl``,
``val.jsonl``, ``README.md``), with the same conversation styles, so real and synthetic data share
one path through training and ``stabguard eval``.
"""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from stabguard.data.jsonl import DataError, write_atomic, write_jsonl
from stabguard.data.pcb import DEFECT_CLASSES
from stabguard.data.synth import conversation
from stabguard.data.workers import map_in_order
from stabguard.progress import ProgressFn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
NAMES = {name.replace("-", "").replace(" ", ""): name for name in DEFECT_CLASSES} | {"copper": "spurious copper"}


def _label(field: str) -> str | None:
    """DeepPCB's number (1-6) or a class name (any case, spaces or dashes) -> our class name."""
    if field.isdigit():
        k = int(field)
        return DEFECT_CLASSES[k - 1] if 1 <= k <= len(DEFECT_CLASSES) else None
    return NAMES.get(field.lower().replace("-", "").replace("_", ""))


def read_annotation(path: Path, size: tuple[int, int]) -> tuple[list[dict], list[str]]:
    """(defects, problems as ``path:line: reason``) of one annotation file, boxes checked against ``size``."""
    defects, problems = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields:
            continue
        label = _label(fields[-1]) if len(fields) == 5 else None
        try:
            box = [int(round(float(v))) for v in fields[:4]] if len(fields) == 5 else None
        except ValueError:
            box = None
        if box is None or label is None:
            problems.append(f"{path}:{lineno}: expected 'x1 y1 x2 y2 type' (type 1-6 or a class name), got {line.strip()!r}")
        elif not (0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]):
            problems.append(f"{path}:{lineno}: box {box} is empty or outside the {size[0]}x{size[1]} image")
        else:
            defects.append({"bbox_2d": box, "label": label})
    return defects, problems


def find_image(annotation: Path) -> Path | None:
    """The test image of an annotation: ``<id>_test.*`` or ``<id>.*``, beside it or in the folder
    named like its own without DeepPCB's ``_not`` suffix."""
    folders = [annotation.parent, annotation.parent.with_name(annotation.parent.name.removesuffix("_not"))]
    for folder in folders:
        for name in (f"{annotation.stem}_test", annotation.stem):
            for suffix in IMAGE_SUFFIXES:
                if (folder / f"{name}{suffix}").is_file():
                    return folder / f"{name}{suffix}"
    return None


def _official_val(src: Path) -> set[str] | None:
    """Annotation paths (relative to ``src``) DeepPCB's ``test.txt`` lists, when it is there."""
    listing = src / "test.txt"
    if not listing.is_file():
        return None
    return {parts[1] for parts in (line.split() for line in listing.read_text().splitlines()) if len(parts) == 2}


def _pairs(src: Path) -> list[tuple[Path, Path]]:
    pairs = [(txt, find_image(txt)) for txt in sorted(src.rglob("*.txt"))]
    pairs = [(txt, image) for txt, image in pairs if image is not None]  # split lists, READMEs: no image
    if not pairs:
        raise DataError(f"{src}: no annotation file (.txt) with a matching image (<id>_test.jpg or <id>.jpg) found")
    return pairs


def _is_val(rel: str, index: int, official: set[str] | None, seed: int, val_fraction: float) -> bool:
    if official is not None:
        return rel in official
    return np.random.default_rng([seed, index, 1]).random() < val_fraction


def read_board(src: Path, pair: tuple[Path, Path]) -> tuple[str, Path, list[dict], list[str]]:
    """(annotation path relative to ``src``, image, defects, problems) of one annotation and its image."""
    txt, image = pair
    with Image.open(image) as im:  # reads the header only: the size the boxes are checked against
        defects, problems = read_annotation(txt, im.size)
    return txt.relative_to(src).as_posix(), image, defects, problems


def import_board(src: Path, out: Path, seed: int, board: tuple[int, str, Path, list[dict]]) -> dict:
    """Copy board ``i``'s image into ``out/images``; its row. The conversation comes from
    ``default_rng([seed, i])`` only, so any worker process writes the same row."""
    i, rel, image, defects = board
    name = "images/" + "_".join(image.relative_to(src).parts)
    shutil.copyfile(image, out / name)
    rng = np.random.default_rng([seed, i])
    return {"messages": conversation(rng, name, defects), "defects": defects, "source": rel}


def import_deeppcb(src: str | Path, out_dir: str | Path, *, val_fraction: float = 0.25, seed: int = 0,
                   workers: int = 1, progress: ProgressFn | None = None) -> dict:
    """Copy images into ``out_dir/images`` and write train/val JSONL conversations; DataError lists every
    bad annotation line (file:line) before anything is written. ``workers`` processes write the same
    bytes as one; the JSONL files are written last and atomically."""
    src, out = Path(src), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    official = _official_val(src)
    boards = map_in_order(partial(read_board, src), _pairs(src), workers=workers, what="annotations read",
                          progress=progress)
    problems = [problem for *_, found in boards for problem in found]
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {src}:\n" + "\n".join(f"  {p}" for p in problems[:50]))
    (out / "images").mkdir(parents=True, exist_ok=True)
    numbered = [(i, rel, image, defects) for i, (rel, image, defects, _) in enumerate(boards)]
    made = map_in_order(partial(import_board, src, out, seed), numbered, workers=workers, what="boards imported",
                        progress=progress)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    for i, row in enumerate(made):
        rows["val" if _is_val(row["source"], i, official, seed, val_fraction) else "train"].append(row)
    return _write(out, src, rows, official is not None)


def _write(out: Path, src: Path, rows: dict, official: bool) -> dict:
    for split, split_rows in rows.items():
        if split_rows:
            write_jsonl(out / f"{split}.jsonl", split_rows)
    counts = {c: sum(d["label"] == c for r in rows["train"] + rows["val"] for d in r["defects"]) for c in DEFECT_CLASSES}
    write_atomic(out / "README.md",
        f"# PCB defect set imported from {src}\n\nMade by `stabguard data import-deeppcb --src {src} --out {out}`.\n"
        f"Split: {'the source test.txt' if official else 'random, by seed'}; train {len(rows['train'])} rows, "
        f"val {len(rows['val'])} rows. Boxes are absolute pixels `[x1, y1, x2, y2]` of each image, as in the "
        "annotation files; each row keeps them in `defects` and its annotation file in `source`.\n\n"
        + "".join(f"- {label}: {count}\n" for label, count in counts.items()))
    return {"out_dir": str(out), "train": str(out / "train.jsonl") if rows["train"] else None,
            "val": str(out / "val.jsonl") if rows["val"] else None, "train_rows": len(rows["train"]),
            "val_rows": len(rows["val"]), "official_split": official, "defects": counts}
