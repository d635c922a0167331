"""stabguard's JSONL conversations in the dataset format of the framework that trains on them.

    stabguard data export data/pcb/train.jsonl --to llamafactory --out data/pcb_llamafactory

The same boards, one format per framework (the forms their Qwen3-VL templates read, checked through each
one's own command in tests/integrations/):

- ``llamafactory``: a sharegpt JSON list, ``{"messages": [{"role", "content": "<image>text"}], "images":
  [paths]}``, and a ``dataset_info.json`` that names it (``dataset: <name>``, ``dataset_dir: <out>``);
- ``ms-swift``: the same rows as JSONL (``--dataset <out>/<name>.jsonl``);
- ``axolotl``: content as lists of typed items throughout (one column type per key), for ``type:
  chat_template`` datasets.

Image paths become absolute: each framework resolves a relative path against something else. Every row
is checked first (``stabguard.data.jsonl``): a bad row stops the export with ``file:line`` and nothing is
written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabguard.data.jsonl import DataError, _parse, write_atomic, write_jsonl

FORMATS = ("llamafactory", "ms-swift", "axolotl")
SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}


def parts(content: Any) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def image_tagged(row: dict, base: Path) -> dict:
    """``{"messages": [...text with <image>...], "images": [absolute paths]}`` (LLaMA-Factory, ms-swift)."""
    messages, images = [], []
    for message in row["messages"]:
        text = ""
        for item in parts(message["content"]):
            if item["type"] == "image":
                text += "<image>"
                images.append(str((base / item["image"]).resolve()))
            else:
                text += item["text"]
        messages.append({"role": message["role"], "content": text})
    return {"messages": messages, "images": images}


def typed_absolute(row: dict, base: Path) -> dict:
    """Content as typed items in every message, image paths absolute (Axolotl's chat_template)."""
    messages = [{"role": m["role"], "content": [
        {"type": "image", "image": str((base / item["image"]).resolve())} if item["type"] == "image" else item
        for item in parts(m["content"])]} for m in row["messages"]]
    return {"id": row.get("id"), "messages": messages}


def export(src: str | Path, to: str, out: str | Path, name: str | None = None) -> list[Path]:
    """Write ``src``'s rows into ``out`` in the format of ``to``; returns the files written."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: not one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    rows, problems = _parse(src, None)
    if problems:
        raise DataError(f"{len(problems)} problem(s), nothing exported:\n" + "\n".join(problems[:20]))
    name = name or src.stem
    out.mkdir(parents=True, exist_ok=True)
    if to == "axolotl":
        path = out / f"{name}.jsonl"
        write_jsonl(path, [typed_absolute(row, src.parent) for _, row in rows])
        return [path]
    tagged = [image_tagged(row, src.parent) for _, row in rows]
    if to == "ms-swift":
        path = out / f"{name}.jsonl"
        write_jsonl(path, tagged)
        return [path]
    return _llamafactory(out, name, tagged)


def _llamafactory(out: Path, name: str, rows: list[dict]) -> list[Path]:
    data, info = out / f"{name}.json", out / "dataset_info.json"
    write_atomic(data, json.dumps(rows))
    known = json.loads(info.read_text()) if info.is_file() else {}  # other datasets in the folder stay
    known[name] = {"file_name": data.name, "formatting": "sharegpt",
                   "columns": {"messages": "messages", "images": "images"}, "tags": SHAREGPT_TAGS}
    write_atomic(info, json.dumps(known, indent=1))
    return [data, info]
