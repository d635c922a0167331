"""Reading and scoring generated PCB inspection answers (what ``stabguard eval`` reports).

The answer format is the one the synthetic data teaches: ``Found k defects:`` then a JSON list of
``{"bbox_2d": [x1, y1, x2, y2], "label": ...}``, or ``No defects found.`` Metrics per val image:

- answers parsed: the share that follow the format at all;
- count accuracy: the stated count (else the number of boxes listed) equals the true count;
- type accuracy: the set of defect types named equals the true set (a clean board: none named);
- mean box IoU: boxes matched greedily by IoU; matched IoUs summed over every box slot
  (``max(predicted, true)`` per image), so missing and extra boxes count as 0;
- precision / recall at IoU 0.5 with the right label.

Parsing never raises: an answer that is not the format scores 0 on every count, as it should.
Pure Python (no torch), so it is cheap to import and to test.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

# The synthetic sets' first detection instruction (stabguard.data.synth.INSTRUCTIONS[0]); a literal, so
# importing this module (the CLI's --help) does not import torch through stabguard.data.
PROMPT = "Inspect this PCB crop for defects. Report each one as JSON with bbox_2d and label."
_FOUND = re.compile(r"found\s+(\d{1,6})\s+defects?", re.IGNORECASE)
_NONE = re.compile(r"no\s+defects?\s+(?:were\s+)?found", re.IGNORECASE)
_OBJECT = re.compile(r"\{[^{}]*\}")


class EvalError(ValueError):
    """Evaluation cannot run: no val data, no adapter, bad ground truth; the message says which."""


# ---------------------------------------------------------------- parsing


@dataclass
class Parsed:
    recognised: bool  # a count line or "No defects found."
    count: int | None  # the stated count, else the number of boxes listed; None when nothing is readable
    defects: list[dict]


def label_key(label: str) -> str:
    """``"Pin-hole"``, ``"pin hole"`` and ``"pin_hole"`` name one class."""
    return " ".join(label.lower().replace("_", " ").replace("-", " ").split())


def to_defect(obj: Any) -> dict | None:
    """``{"bbox_2d": [x1, y1, x2, y2] (floats, x1 < x2, y1 < y2), "label": str}``, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
        return None
    box = obj.get("bbox_2d")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return {"bbox_2d": [x1, y1, x2, y2], "label": obj["label"]}


def _objects(text: str) -> list:
    """The JSON list in the text when it parses whole, else every ``{...}`` that parses on its own."""
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            value = json.loads(text[start : end + 1])
            if isinstance(value, list):
                return value
        except (ValueError, RecursionError):
            pass
    found = []
    for match in _OBJECT.finditer(text):
        try:
            found.append(json.loads(match.group()))
        except (ValueError, RecursionError):
            continue
    return found


def parse_answer(text: Any) -> Parsed:
    """Read a generated answer; anything unreadable gives ``Parsed(False, None, [])``, never an error."""
    text = text if isinstance(text, str) else ""
    found, none = _FOUND.search(text), _NONE.search(text)
    defects = [d for d in map(to_defect, _objects(text)) if d is not None]
    if found:
        count = int(found.group(1))
    elif none and not defects:
        count = 0
    else:
        count = len(defects) or None
    return Parsed(bool(found) or (bool(none) and not defects), count, defects)


# ---------------------------------------------------------------- scoring


def iou(a: list[float], b: list[float]) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def greedy_match(pred: list[dict], truth: list[dict]) -> list[tuple[int, int, float]]:
    """(pred index, truth index, IoU): the best-overlapping pair first, each box used once, IoU > 0."""
    pairs = [(iou(p["bbox_2d"], t["bbox_2d"]), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)]
    used_p, used_t, matches = set(), set(), []
    for value, i, j in sorted(pairs, key=lambda x: (-x[0], x[1], x[2])):
        if value <= 0:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            matches.append((i, j, value))
    return matches


def score_sample(parsed: Parsed, truth: list[dict]) -> dict:
    """One answer's counts; ``summarize`` turns many of them into the metrics."""
    matches = greedy_match(parsed.defects, truth)
    pred, hits = parsed.defects, 0
    for i, j, value in matches:
        hits += value >= 0.5 and label_key(pred[i]["label"]) == label_key(truth[j]["label"])
    types = {label_key(d["label"]) for d in pred}
    return {
        "recognised": parsed.recognised,
        "count_ok": parsed.count == len(truth),
        "types_ok": parsed.recognised and types == {label_key(d["label"]) for d in truth},
        "iou_sum": sum(m[2] for m in matches), "box_slots": max(len(pred), len(truth)),
        "hits": hits, "predicted": len(pred), "true": len(truth),
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(scores: list[dict]) -> dict:
    """Metrics over samples; None where a metric has nothing to measure (no boxes anywhere)."""
    total = lambda key: sum(s[key] for s in scores)  # noqa: E731
    return {
        "samples": len(scores),
        "answers_parsed": _ratio(total("recognised"), len(scores)),
        "count_accuracy": _ratio(total("count_ok"), len(scores)),
        "type_accuracy": _ratio(total("types_ok"), len(scores)),
        "box_iou": _ratio(total("iou_sum"), total("box_slots")),
        "precision_50": _ratio(total("hits"), total("predicted")),
        "recall_50": _ratio(total("hits"), total("true")),
    }


def truth_of(row: dict, sample_id: str) -> list[dict] | None:
    """A row's ground truth: its ``defects`` key, else its first assistant reply in the answer format."""
    if "defects" in row:
        defects = row["defects"]
        checked = [to_defect(d) for d in defects] if isinstance(defects, list) else [None]
        if None in checked:
            raise EvalError(f"{sample_id}: defects: each must be {{\"bbox_2d\": [x1, y1, x2, y2], \"label\": str}} "
                            f"with x1 < x2 and y1 < y2; got {str(defects)[:120]}")
        return checked
    for message in row["messages"]:
        if message["role"] == "assistant" and isinstance(message["content"], str):
            parsed = parse_answer(message["content"])
            if parsed.recognised:
                return parsed.defects
    return None


def result_record(sample_id: str, answer: str, truth: list[dict]) -> tuple[dict, dict]:
    parsed = parse_answer(answer)
    return score_sample(parsed, truth), {"id": sample_id, "answer": answer, "parsed": asdict(parsed), "truth": truth}
