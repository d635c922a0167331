"""Drawing DeepPCB's six defect classes on a synthetic board, each with a box that cannot miss it.

Each ground-truth box is the box of the pixels a defect changed, plus a margin, so a box always holds
its defect; a defect whose box would touch an earlier one is dropped, so boxes never overlap. Sites are
chosen on straight, bare stretches of trace so that an "open" cuts a trace and not a pad.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageDraw

from stabguard.data.copper import Layer


class DefectPainter:
    """Draws defects on a copy of the board and keeps each one only if it is clear of the others."""

    def __init__(self, layer: Layer, rng: np.random.Generator):
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
        box = defect_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, self.layer.size, self.s)
        if any(boxes_overlap(box, other, 3) for other in self.boxes):
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


def defect_box(x1: int, y1: int, x2: int, y2: int, size: int, s: float) -> list[int]:
    """Tight box of the changed pixels, widened by a margin and to a minimum size, inside the image."""
    margin, least = round(3 * s), round(12 * s)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = max((x2 - x1) / 2 + margin, least / 2), max((y2 - y1) / 2 + margin, least / 2)
    return [max(0, int(cx - hw)), max(0, int(cy - hh)), min(size, math.ceil(cx + hw)), min(size, math.ceil(cy + hh))]


def boxes_overlap(a: list[int], b: list[int], margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin
