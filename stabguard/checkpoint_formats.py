"""What a checkpoint file's own format says about whether it is whole, for checkpoints without a manifest.

A checkpoint saved before manifests (or by the Trainer alone) has no sizes or hashes to check against, but
its two common formats end in a way a cut-off copy cannot fake: a torch file (``optimizer.pt``,
``rng_state.pth``, ``training_args.bin``) is a zip archive whose directory is at its end; a safetensors file
is exactly as long as its header says. Neither check reads more than the header and the tail.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"


def format_problem(path: Path) -> str | None:
    """Why ``path`` is visibly cut short, or None (whole, or a format this cannot judge)."""
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_zip_problem(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    return None


def _torch_zip_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        zipped = f.read(4) == ZIP_MAGIC  # torch's older pickle format is not a zip: not judged
    if zipped and not zipfile.is_zipfile(path):
        return f"{path.name} is cut short: a zip archive (torch.save) without its directory at the end"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = f.read(length) if length is not None and length < size else b""
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is cut short: its safetensors header is incomplete"
    expected = 8 + length + end
    return None if size == expected else f"{path.name} is {size} B, its safetensors header says {expected} B"
