"""DeepPCB-style folders in, the same JSONL conversations out (one command)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stabguard.cli.data import command
from stabguard.data import ConversationDataset, DataError
from stabguard.data.deeppcb import import_deeppcb
from stabguard.scoring import truth_of

# (group, board id, annotation text, boxes expected) in DeepPCB's own layout and number codes.
BOARDS = [
    ("20085", "20085000", "10,20,50,60,1\n100,100,140,130,5\n", [([10, 20, 50, 60], "open"),
                                                                  ([100, 100, 140, 130], "spurious copper")]),
    ("20085", "20085001", "", []),
    ("12000", "12000007", "5 5 25 30 3\n\n200 10 230 40 6\n", [([5, 5, 25, 30], "mousebite"),
                                                                ([200, 10, 230, 40], "pin-hole")]),
    ("12000", "12000008", "0,0,640,640,2\n", [([0, 0, 640, 640], "short")]),
]


def _deeppcb(root, boards=BOARDS, split=True):
    for group, board, text, _ in boards:
        images, notes = root / f"group{group}" / group, root / f"group{group}" / f"{group}_not"
        images.mkdir(parents=True, exist_ok=True)
        notes.mkdir(parents=True, exist_ok=True)
        pixels = (np.random.default_rng(int(board)).random((640, 640)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(pixels).save(images / f"{board}_test.jpg")
        Image.fromarray(pixels).save(images / f"{board}_temp.jpg")  # the template: not imported
        (notes / f"{board}.txt").write_text(text)
    if split:
        lines = [f"group{g}/{g}/{b}.jpg group{g}/{g}_not/{b}.txt" for g, b, *_ in boards]
        (root / "trainval.txt").write_text("\n".join(lines[:3]) + "\n")
        (root / "test.txt").write_text(lines[3] + "\n")
    return root


def test_import_keeps_boxes_labels_and_the_official_split(tmp_path):
    written = import_deeppcb(_deeppcb(tmp_path / "PCBData"), tmp_path / "out")
    assert written["official_split"] and (written["train_rows"], written["val_rows"]) == (3, 1)
    rows = {}
    for split in ("train", "val"):
        ds = ConversationDataset(written[split])
        assert ds[0]["images"][0].size == (640, 640)
        for i, (_, row) in enumerate(ds.rows):
            rows[row["source"]] = row
            assert truth_of(row, ds.sample_id(i)) is not None
    for group, board, _, expected in BOARDS:
        row = rows[f"group{group}/{group}_not/{board}.txt"]
        assert [(d["bbox_2d"], d["label"]) for d in row["defects"]] == expected
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert any(a.startswith(f"Found {len(expected)} defect") for a in answers) or not expected
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == sorted(
        f"group{g}_{g}_{b}_test.jpg" for g, b, *_ in BOARDS)
    assert "spurious copper: 1" in (tmp_path / "out/README.md").read_text()


def test_without_a_split_file_the_seed_splits(tmp_path):
    src = _deeppcb(tmp_path / "src", split=False)
    a = import_deeppcb(src, tmp_path / "a", val_fraction=0.5, seed=3)
    import_deeppcb(src, tmp_path / "b", val_fraction=0.5, seed=3)
    assert not a["official_split"] and a["train_rows"] + a["val_rows"] == len(BOARDS)
    assert (tmp_path / "a/train.jsonl").read_text() == (tmp_path / "b/train.jsonl").read_text()


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    src = _deeppcb(tmp_path / "src", split=False)
    seen = []
    import_deeppcb(src, tmp_path / "one", val_fraction=0.5, seed=3)
    import_deeppcb(src, tmp_path / "two", val_fraction=0.5, seed=3, workers=2, progress=lambda *a: seen.append(a))
    files = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()}
    assert {"train.jsonl", "images/group12000_12000_12000007_test.jpg"} <= {p.as_posix() for p in files}
    for name in files - {Path("README.md")}:  # the README names its own folder
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert seen[-1] == ("boards imported", len(BOARDS), len(BOARDS)) and ("annotations read", 4, 4) in seen


@pytest.mark.parametrize("text, reason", [
    ("10,20,50,60\n", "expected 'x1 y1 x2 y2 type'"),
    ("10,20,50,60,9\n", "expected 'x1 y1 x2 y2 type'"),
    ("a,b,c,d,1\n", "expected 'x1 y1 x2 y2 type'"),
    ("50,20,10,60,1\n", "is empty or outside the 640x640 image"),
    ("600,600,700,640,1\n", "is empty or outside the 640x640 image"),
])
def test_bad_annotation_lines_name_file_and_line_and_nothing_is_written(tmp_path, text, reason):
    boards = BOARDS[:1] + [("20085", "20085002", "1,1,5,5,open\n" + text, [])]
    src = _deeppcb(tmp_path / "src", boards, split=False)
    with pytest.raises(DataError) as info:
        import_deeppcb(src, tmp_path / "out")
    assert "group20085/20085_not/20085002.txt:2: " in str(info.value) and reason in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_import_deeppcb(tmp_path):
    src = _deeppcb(tmp_path / "PCBData")
    result = CliRunner().invoke(command, ["import-deeppcb", "--src", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "imported 4 boards" in result.output and "test.txt split) in " in result.output
    assert json.loads((tmp_path / "o/val.jsonl").read_text())["source"] == "group12000/12000_not/12000008.txt"
    (tmp_path / "empty").mkdir()
    bad = CliRunner().invoke(command, ["import-deeppcb", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no annotation file" in bad.output
