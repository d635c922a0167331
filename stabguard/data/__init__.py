"""Dataset readers (JSONL conversations with images) and the synthetic PCB generator."""

from __future__ import annotations

from stabguard.data.jsonl import ConversationDataset, DataError, check_images, check_rows, missing_file, row_problems
from stabguard.data.synth import DEFECT_CLASSES, Board, make_board, synth_pcb

__all__ = [
    "DEFECT_CLASSES",
    "Board",
    "ConversationDataset",
    "DataError",
    "check_images",
    "check_rows",
    "make_board",
    "missing_file",
    "row_problems",
    "synth_pcb",
]
