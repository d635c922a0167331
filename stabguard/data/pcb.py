"""Synthetic PCB boards: a copper layout imitating DeepPCB crops, then defects drawn on a copy.

The clean board ("template") is :mod:`stabguard.data.copper`'s; DeepPCB's six defect classes are drawn
on it by :mod:`stabguard.data.defects`; this module puts the two together into a :class:`Board`.
Everything comes from the ``rng`` passed in: same generator state, same board. Conversations and files
are :mod:`stabguard.data.synth`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stabguard.data.copper import Layer, layout  # noqa: F401 - Layer: importable from here as before
from stabguard.data.defects import DefectPainter

DEFECT_CLASSES = ("open", "short", "mousebite", "spur", "spurious copper", "pin-hole")


@dataclass
class Board:
    """One synthetic crop: the defect-free template, the test image, and its ground truth."""

    template: np.ndarray
    image: np.ndarray
    defects: list[dict] = field(default_factory=list)


def make_board(rng: np.random.Generator, size: int = 256) -> Board:
    """One crop with 0-3 defects; a class that finds no site on this board gives way to another."""
    layer = layout(rng, size)
    defects, labels = DefectPainter(layer, rng), []
    for _ in range(int(rng.integers(0, 4))):
        for _attempt in range(4):
            label = DEFECT_CLASSES[int(rng.integers(len(DEFECT_CLASSES)))]
            if defects.add(label):
                labels.append(label)
                break
    truth = [{"bbox_2d": box, "label": label} for box, label in zip(defects.boxes, labels)]
    return Board(np.asarray(layer.img).copy(), np.asarray(defects.img).copy(), truth)
