"""Synthetic PCB inspection data in the same JSONL format as real data, so demos and tests use one path.

Boards imitate DeepPCB crops: binarised images, white copper on black. Traces run straight and at
45 degrees, in parallel buses that start at pads and end at vias; some crops hold thick power traces
and a copper pour. DeepPCB's six defect classes are then drawn on the clean board ("template"), and
each ground-truth box is the box of the pixels that changed, plus a margin, so a box can never miss
its defect. Everything comes from ``numpy.random.default_rng([seed, board])``: same seed, same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_CLASSES = ("open", "short", "mousebite", "spur", "spurious copper", "pin-hole")
DIRS = [(math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)]


@dataclass
class Board:
    """One synthetic crop: the defect-free template, the test image, and its ground truth."""

    template: np.ndarray
    image: np.ndarray
    defects: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- copper layout


class _Layer:
    """The copper image plus what defect placement needs: a net label per pixel, trace geometry."""

    def __init__(self, size: int):
        self.size, self.s = size, size / 256
        self.clear = max(3, round(4 * self.s))  # minimum gap between separate conductors
        self.img, self.keep, self.labels = (Image.new(m, (size, size), 0) for m in ("L", "L", "I"))
        self.traces: list[tuple[np.ndarray, float, int]] = []  # (polyline, width, net)
        self.nets = 0

    def place(self, nets: list[list[tuple]]) -> bool:
        """Draw these nets if their copper stays clear of everything placed before."""
        scratch = Image.new("L", self.img.size, 0)
        for prims in nets:
            _draw(ImageDraw.Draw(scratch), prims, 255)
        new = np.asarray(scratch) > 0
        if new.sum() < 40 or (new & (np.asarray(self.keep) > 0)).any():
            return False
        for prims in nets:
            self.nets += 1
            _draw(ImageDraw.Draw(self.keep), prims, 255, grow=self.clear)
            _draw(ImageDraw.Draw(self.img), prims, 255)
            _draw(ImageDraw.Draw(self.labels), prims, self.nets)
            self.traces += [(p[1], p[2], self.nets) for p in prims if p[0] == "line"]
        return True


def _draw(draw: ImageDraw.ImageDraw, prims: list[tuple], fill: int, grow: float = 0) -> None:
    """Copper primitives first, then drill holes; ``grow`` widens copper to draw clearance zones."""
    for kind, *a in prims:
        if kind == "line":
            draw.line([tuple(p) for p in a[0]], fill=fill, width=round(a[1] + 2 * grow), joint="curve")
        elif kind == "disc":
            (x, y), r = a[0], a[1] + grow
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif kind == "rect":
            (x, y), hw, hh = a[0], a[1] + grow, a[2] + grow
            draw.rectangle([x - hw, y - hh, x + hw, y + hh], fill=fill)
        elif kind == "poly":
            draw.polygon([tuple(p) for p in a[0]], fill=fill)
            if grow:
                draw.line([tuple(p) for p in a[0] + a[0][:1]], fill=fill, width=round(2 * grow))
    for kind, *a in prims:
        if kind == "hole" and not grow:
            (x, y), r = a
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)


def _route(rng: np.random.Generator, size: int, s: float, min_leg: float) -> np.ndarray:
    """A centre line: straight legs joined by 45-degree segments, turning at most 90 degrees overall."""
    d = int(rng.choice([0, 2, 4, 6]))
    if rng.random() < 0.4:  # enters the crop from off-image, as real crops cut traces at the edge
        across = rng.uniform(-0.4, 0.4, 2) * size * np.abs(DIRS[(d + 2) % 8])
        p = np.array([size / 2, size / 2]) - np.array(DIRS[d]) * (size / 2 + 8) + across
    else:
        p = rng.uniform(0.12, 0.88, 2) * size
    pts, turned = [p], 0
    for leg in range(int(rng.integers(1, 4))):
        p = p + np.array(DIRS[d]) * rng.uniform(min_leg, min_leg + 80 * s)
        pts.append(p)
        if leg == 2 or rng.random() < 0.3:
            break
        turn = int(rng.choice([-1, 1]))
        d = (d + turn) % 8
        p = p + np.array(DIRS[d]) * rng.uniform(min_leg * 0.6, min_leg * 0.6 + 25 * s)
        pts.append(p)
        again = turn if abs(turned + 2 * turn) <= 2 and rng.random() < 0.5 else -turn
        turned += turn + again
        d = (d + again) % 8
    return np.array(pts)


def _offset(pts: np.ndarray, o: float) -> np.ndarray | None:
    """The polyline shifted sideways by ``o`` with mitred corners; None if a segment would flip."""
    u = np.diff(pts, axis=0)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    n = np.stack([-u[:, 1], u[:, 0]], 1)
    mid = [pts[k] + o * (n[k - 1] + n[k]) / (1 + n[k - 1] @ n[k]) for k in range(1, len(pts) - 1)]
    out = np.array([pts[0] + o * n[0], *mid, pts[-1] + o * n[-1]])
    return out if (np.einsum("ij,ij->i", np.diff(out, axis=0), u) > 1).all() else None


def _terminal(p: np.ndarray, u: np.ndarray, pad: float, kind: str) -> list[tuple]:
    """A pad or via at a trace end: through-hole ring, SMD rectangle, or via."""
    if kind == "smd":
        long_, short = pad * 0.85, pad / 2
        hw, hh = (long_, short) if abs(u[0]) > 0.5 else (short, long_)
        return [("rect", p - u * long_ * 0.5, hw, hh)]
    hole = pad * (0.22 if kind == "via" else 0.28)
    return [("disc", p, pad / 2), ("hole", p, max(1.0, hole))]


def _try_bus(rng: np.random.Generator, layer: _Layer) -> bool:
    """k parallel traces (separate nets) from a row of pads to vias, pads or off the crop."""
    s, size = layer.s, layer.size
    thick = rng.random() < 0.2
    k = 1 if thick else int(rng.integers(1, 6))
    w = rng.uniform(9, 13) * s if thick else rng.uniform(3.5, 6.5) * s
    pad = w + rng.uniform(4, 7) * s if not thick else w + 6 * s
    pitch = pad + layer.clear + rng.uniform(0, 3) * s
    base = _route(rng, size, s, min_leg=k * pitch + 10 * s)
    start, end = rng.choice(["tht", "smd"]), rng.choice(["via", "via", "tht", "smd"])
    nets = []
    for i in range(k):
        line = _offset(base, (i - (k - 1) / 2) * pitch)
        if line is None:
            return False
        u0 = (line[1] - line[0]) / np.linalg.norm(line[1] - line[0])
        u1 = (line[-1] - line[-2]) / np.linalg.norm(line[-1] - line[-2])
        prims = [("line", line, w)]
        prims += _terminal(line[0], -u0, pad, start) + _terminal(line[-1], u1, pad, end)
        nets.append(prims)
    return layer.place(nets)


def _try_pour(rng: np.random.Generator, layer: _Layer) -> bool:
    """A copper area running off one edge of the crop, with one chamfered corner."""
    size, s = layer.size, layer.s
    w, h = rng.uniform(50, 110, 2) * s
    x0 = -10 if rng.random() < 0.5 else size + 10 - w
    y0 = rng.uniform(0, size - h)
    cut = rng.uniform(10, 25) * s
    pts = [(x0, y0), (x0 + w - cut, y0), (x0 + w, y0 + cut), (x0 + w, y0 + h), (x0, y0 + h)]
    if x0 > 0:
        pts = [(2 * x0 + w - x, y) for x, y in pts]
    return layer.place([[("poly", pts)]])


def _layout(rng: np.random.Generator, size: int) -> _Layer:
    layer = _Layer(size)
    if rng.random() < 0.35:
        _try_pour(rng, layer)
    want, placed = int(rng.integers(5, 9)), 0
    for _ in range(60):
        placed += _try_bus(rng, layer)
        if placed >= want:
            break
    for _ in range(int(rng.integers(2, 8))):
        p, r = rng.uniform(0.05, 0.95, 2) * size, rng.uniform(4, 6) * layer.s
        layer.place([[("disc", p, r), ("hole", p, r * 0.45)]])
    return layer


# ---------------------------------------------------------------- defects


class _Defects:
    """Draws defects on a copy of the board and keeps each one only if it is clear of the others."""

    def __init__(self, layer: _Layer, rng: np.random.Generator):
        self.layer, self.rng, self.s = layer, rng, layer.s
        self.img = layer.img.copy()
        self.labels = np.asarray(layer.labels)
        self.boxes: list[list[int]] = []

    def board(self) -> np.ndarray:
        return np.asarray(self.img)

    def site(self, min_w: float, min_len: float, reach: float = 0.5):
        """A point on a straight, bare stretch of trace: (point, tangent, normal, width, net).

        The trace must run clean ``reach`` trace widths (plus a few pixels) either way, so a defect
        lands on the trace itself and not where it meets a pad, a via or another defect.
        """
        size, rng = self.layer.size, self.rng
        for _ in range(30):
            pts, w, net = self.layer.traces[int(rng.integers(len(self.layer.traces)))]
            seg = int(rng.integers(len(pts) - 1))
            a, b = pts[seg], pts[seg + 1]
            length = float(np.linalg.norm(b - a))
            p, u = a + (b - a) * rng.uniform(0.3, 0.7), (b - a) / max(length, 1e-6)
            inside = (8 * self.s < p).all() and (p < size - 8 * self.s).all()
            if w >= min_w and length >= min_len and inside and self._bare(p, u, w, net, reach * w + 4 * self.s):
                return p, u, np.array([-u[1], u[0]]) * rng.choice([-1, 1]), w, net
        return None

    def _bare(self, p: np.ndarray, u: np.ndarray, w: float, net: int, span: float) -> bool:
        """Both edges of the trace run clean for ``span`` either way: no pad, via, joint or defect there."""
        n, t, board = np.array([-u[1], u[0]]), np.arange(-span, span + 1)[:, None], self.board()
        for side in (-1, 1):
            xi, yi = np.round(p + u * t + side * n * max(w / 2 - 1, 0)).astype(int).T
            xo, yo = np.round(p + u * t + side * n * (w / 2 + 1.5)).astype(int).T
            if min(xo.min(), yo.min()) < 0 or max(xo.max(), yo.max()) >= self.layer.size:
                return False
            if (self.labels[yi, xi] != net).any() or not board[yi, xi].all() or board[yo, xo].any():
                return False
        return True

    def free_run(self, p: np.ndarray, n: np.ndarray, w: float, net: int, max_d: float) -> tuple[int, int]:
        """Pixels of gap beside a trace along ``n``, and the net hit there (0: none, -1: image edge)."""
        board = self.board()
        for d in range(1, int(max_d) + 1):
            x, y = np.round(p + n * (w / 2 + d)).astype(int)
            if not (0 <= x < self.layer.size and 0 <= y < self.layer.size):
                return d, -1
            if board[y, x] and self.labels[y, x] != net:
                return d, int(self.labels[y, x]) or -2
        return int(max_d), 0

    def add(self, label: str) -> bool:
        """Try to draw one defect of ``label``; keep it if it changed pixels clear of earlier boxes."""
        trial = self.img.copy()
        drawers = {"open": self._open, "short": self._short, "mousebite": self._mousebite, "spur": self._spur,
                   "spurious copper": self._spurious_copper, "pin-hole": self._pin_hole}
        if not drawers[label](ImageDraw.Draw(trial)):
            return False
        ys, xs = np.nonzero(np.asarray(trial) != self.board())
        if not len(xs):
            return False
        box = _box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, self.layer.size, self.s)
        if any(_overlap(box, other, 3) for other in self.boxes):
            return False
        self.img, self.boxes = trial, self.boxes + [box]
        return True

    def _open(self, draw: ImageDraw.ImageDraw) -> bool:
        site = self.site(3, 30 * self.s)
        if site is None:
            return False
        p, u, n, w, _ = site
        g = self.rng.uniform(3, 7) * self.s / 2
        ext = w / 2 + min(1.5, self.layer.clear / 2 - 0.5)
        skew = u * self.rng.uniform(-1.5, 1.5) * self.s
        draw.polygon([tuple(q) for q in (p - u * g - n * ext - skew, p + u * g - n * ext - skew,
                                         p + u * g + n * ext + skew, p - u * g + n * ext + skew)], fill=0)
        return True

    def _short(self, draw: ImageDraw.ImageDraw) -> bool:
        site = self.site(3, 20 * self.s)
        if site is None:
            return False
        p, u, n, w, net = site
        d, hit = self.free_run(p, n, w, net, 18 * self.s)
        if hit <= 0:
            return False
        p = p + u * self.rng.uniform(-2, 2) * self.s
        width = round(self.rng.uniform(2.5, 4.5) * self.s)
        draw.line([tuple(p), tuple(p + n * (w / 2 + d + 1.5))], fill=255, width=width)
        return True

    def _mousebite(self, draw: ImageDraw.ImageDraw) -> bool:
        site = self.site(max(4.0, 4.5 * self.s), 30 * self.s, reach=1.8)
        if site is None:
            return False
        p, u, n, w, _ = site
        k = int(self.rng.integers(2, 5))
        for j in range(k):
            r = self.rng.uniform(0.3, 0.42) * w
            c = p + n * w / 2 + u * (j - (k - 1) / 2) * 0.42 * w * 2.1  # apart, so no copper crumbs between
            draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=0)
        return True

    def _spur(self, draw: ImageDraw.ImageDraw) -> bool:
        site = self.site(3, 20 * self.s)
        if site is None:
            return False
        p, u, n, w, net = site
        d, _ = self.free_run(p, n, w, net, 16 * self.s)
        length = min(self.rng.uniform(4, 9) * self.s, d - 3)
        if length < 3 * self.s:
            return False
        base, half = p + n * (w / 2 - 1.5), max(1.5, self.rng.uniform(1.2, 2.2) * self.s)
        tip = p + n * (w / 2 + length) + u * self.rng.uniform(-1.5, 1.5) * self.s
        corners = (base - u * half, base + u * half, tip + u * 0.5, tip - u * 0.5)
        draw.polygon([tuple(q) for q in corners], fill=255)
        return True

    def _spurious_copper(self, draw: ImageDraw.ImageDraw) -> bool:
        size, rng, board = self.layer.size, self.rng, self.board()
        for _ in range(40):
            c, r = rng.uniform(10 * self.s, size - 10 * self.s, 2), rng.uniform(2.5, 5.5) * self.s
            x, y, R = int(c[0]), int(c[1]), int(r + self.layer.clear + 2)
            if not board[max(0, y - R): y + R + 1, max(0, x - R): x + R + 1].any():
                angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(5, 9))))
                radii = r * rng.uniform(0.5, 1.0, len(angles))
                draw.polygon([(x + q * math.cos(a), y + q * math.sin(a)) for a, q in zip(angles, radii)], fill=255)
                draw.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=255)  # one piece, not crumbs
                return True
        return False

    def _pin_hole(self, draw: ImageDraw.ImageDraw) -> bool:
        board, rng = self.board(), self.rng
        ys, xs = np.nonzero(board)
        for i in rng.integers(len(xs), size=60) if len(xs) else []:
            r = rng.uniform(1.5, 2.6) * self.s
            x, y, R = int(xs[i]), int(ys[i]), math.ceil(r + 2.5)
            inside = R <= x < board.shape[1] - R and R <= y < board.shape[0] - R
            if inside and board[y - R: y + R + 1, x - R: x + R + 1].all():
                draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
                return True
        return False


def _box(x1: int, y1: int, x2: int, y2: int, size: int, s: float) -> list[int]:
    """Tight box of the changed pixels, widened by a margin and to a minimum size, inside the image."""
    margin, least = round(3 * s), round(12 * s)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = max((x2 - x1) / 2 + margin, least / 2), max((y2 - y1) / 2 + margin, least / 2)
    return [max(0, int(cx - hw)), max(0, int(cy - hh)), min(size, math.ceil(cx + hw)), min(size, math.ceil(cy + hh))]


def _overlap(a: list[int], b: list[int], margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def make_board(rng: np.random.Generator, size: int = 256) -> Board:
    """One crop with 0-3 defects; a class that finds no site on this board gives way to another."""
    layer = _layout(rng, size)
    defects, labels = _Defects(layer, rng), []
    for _ in range(int(rng.integers(0, 4))):
        for _attempt in range(4):
            label = DEFECT_CLASSES[int(rng.integers(len(DEFECT_CLASSES)))]
            if defects.add(label):
                labels.append(label)
                break
    truth = [{"bbox_2d": box, "label": label} for box, label in zip(defects.boxes, labels)]
    return Board(np.asarray(layer.img).copy(), np.asarray(defects.img).copy(), truth)


# ---------------------------------------------------------------- conversations and files

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
EXPLAIN = {
    "open": "the trace is cut through, so the circuit is open",
    "short": "a copper bridge joins two conductors that should be separate",
    "mousebite": "bites are missing from the edge of the trace",
    "spur": "a spike of copper sticks out from the trace edge",
    "spurious copper": "an isolated piece of copper belongs to no conductor",
    "pin-hole": "a small hole goes through the copper",
}


def answer(defects: list[dict]) -> str:
    """The assistant's first reply: a count, then the boxes as a JSON list."""
    if not defects:
        return "No defects found."
    noun = "defect" if len(defects) == 1 else "defects"
    return f"Found {len(defects)} {noun}:\n" + json.dumps(defects)


def conversation(rng: np.random.Generator, image: str, defects: list[dict]) -> list[dict]:
    """One row's messages; about a third get a follow-up turn so multi-turn masking is exercised."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    text = {"type": "text", "text": pick(INSTRUCTIONS)}
    content = [{"type": "image", "image": image}, text]
    messages = [{"role": "system", "content": pick(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": content[::-1] if rng.random() < 0.2 else content},
                 {"role": "assistant", "content": answer(defects)}]
    if rng.random() < 0.35:
        if defects:
            d = pick(defects)
            messages += [{"role": "user", "content": f"What kind of defect is at {d['bbox_2d']}?"},
                         {"role": "assistant", "content": f"It is a {d['label']}: {EXPLAIN[d['label']]}."}]
        else:
            messages += [{"role": "user", "content": "Is any trace broken or bridged?"},
                         {"role": "assistant", "content": "No. Every trace is continuous and no copper "
                                                          "bridges separate conductors."}]
    return messages


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _split(n: int, seed: int, val_fraction: float) -> set[int]:
    """Board indices for validation: at least one when asked for and there are two boards or more."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())


def synth_pcb(out_dir: str | Path, n: int, seed: int = 0, size: int = 256, val_fraction: float = 0.25) -> dict:
    """Write ``n`` boards: images/*.png, train.jsonl, val.jsonl (if any) and annotations.json.

    Board ``i`` depends only on ``(seed, i)``, so a larger ``n`` adds boards without changing the
    first ones. Returns what was written: paths, row counts and defects per class.
    """
    if n < 1 or size < 64 or not 0 <= val_fraction < 1:
        raise ValueError(f"synth_pcb: need n >= 1, size >= 64, 0 <= val_fraction < 1; got n={n}, "
                         f"size={size}, val_fraction={val_fraction}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    val, rows, boards = _split(n, seed, val_fraction), {"train": [], "val": []}, []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        board, image = make_board(rng, size), f"images/board_{i:04d}.png"
        Image.fromarray(board.image).save(out / image)
        split = "val" if i in val else "train"
        rows[split].append({"messages": conversation(rng, image, board.defects), "defects": board.defects, "board": i})
        boards.append({"image": image, "split": split, "defects": board.defects})
    _write_jsonl(out / "train.jsonl", rows["train"])
    if rows["val"]:
        _write_jsonl(out / "val.jsonl", rows["val"])
    notes = {"source": "stabguard synth_pcb", "seed": seed, "size": size, "classes": list(DEFECT_CLASSES),
             "boards": boards}
    (out / "annotations.json").write_text(json.dumps(notes, indent=1) + "\n", encoding="utf-8")
    counts = {c: sum(d["label"] == c for b in boards for d in b["defects"]) for c in DEFECT_CLASSES}
    return {"out_dir": str(out), "images": n, "train": str(out / "train.jsonl"),
            "val": str(out / "val.jsonl") if rows["val"] else None, "annotations": str(out / "annotations.json"),
            "train_rows": len(rows["train"]), "val_rows": len(rows["val"]), "defects": counts}
