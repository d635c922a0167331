"""The copper of a synthetic PCB board: traces, pads, vias and pours imitating DeepPCB crops.

Binarised images, white copper on black. Traces run straight and at 45 degrees, in parallel buses that
start at pads and end at vias; some crops hold thick power traces and a copper pour. A :class:`Layer`
keeps what defect placement needs (a net label per pixel, the trace geometry); the defects themselves
are :mod:`stabguard.data.defects`'. Everything comes from the ``rng`` passed in.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

DIRS = [(math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)) for k in range(8)]


class Layer:
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


def _try_bus(rng: np.random.Generator, layer: Layer) -> bool:
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


def _try_pour(rng: np.random.Generator, layer: Layer) -> bool:
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


def layout(rng: np.random.Generator, size: int) -> Layer:
    """Sometimes a pour, then 5-8 buses (as many as fit in 60 tries), then a few stray vias."""
    layer = Layer(size)
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
