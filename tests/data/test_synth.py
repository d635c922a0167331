"""Synthetic PCB data: deterministic, boxes on the defects they name, rows that load as a dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from stabguard.cli.data import command
from stabguard.data import DEFECT_CLASSES, ConversationDataset, make_board, synth_pcb
from stabguard.data import synth
from stabguard.data.synth import INSTRUCTIONS, QUESTIONS, WHERE_FOLLOW_UP

REMOVES_COPPER = {"open", "mousebite", "pin-hole"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcb")
    start = time.perf_counter()
    result = synth_pcb(out, 48, seed=0)
    result["seconds"] = time.perf_counter() - start
    return result


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (synth_pcb(tmp_path / name, 12, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    files_a, files_b, files_c = (_files(tmp_path / name) for name in "abc")
    assert files_a == files_b and a["defects"] == b["defects"]
    assert files_a.keys() == files_c.keys()
    differing = [k for k in files_a if k.startswith("images/") and files_a[k] != files_c[k]]
    assert len(differing) == 12
    assert files_a["annotations.json"] != files_c["annotations.json"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    one, two = (synth_pcb(tmp_path / name, 9, seed=5, size=128, workers=workers)
                for name, workers in (("one", 1), ("two", 2)))
    files = _files(tmp_path / "one")
    assert files == _files(tmp_path / "two") and one["defects"] == two["defects"]
    assert len([name for name in files if name.startswith("images/")]) == 9


def _interrupt_at(monkeypatch, k):
    make_row = synth.make_row

    def make_row_or_stop(out, seed, size, i):
        if i == k:
            raise KeyboardInterrupt
        return make_row(out, seed, size, i)

    monkeypatch.setattr(synth, "make_row", make_row_or_stop)


def test_an_interrupt_writes_no_jsonl_and_leaves_an_existing_one_alone(tmp_path, monkeypatch):
    synth_pcb(tmp_path / "old", 4, seed=1, size=64)
    before = _files(tmp_path / "old")
    _interrupt_at(monkeypatch, 3)
    for out in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(KeyboardInterrupt):
            synth_pcb(out, 8, seed=2, size=64)
    assert not any(name.endswith(".jsonl") or name.endswith(".tmp") for name in _files(tmp_path / "new"))
    after = _files(tmp_path / "old")
    assert {k: v for k, v in after.items() if not k.startswith("images/")} == {
        k: v for k, v in before.items() if not k.startswith("images/")}


def test_cli_ctrl_c_says_how_far_it_got_in_one_line_and_exits_130(tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 3)
    result = CliRunner().invoke(command, ["synth-pcb", "--out", str(tmp_path), "--n", "8", "--workers", "1"])
    assert result.exit_code == 130, result.output
    assert result.output == (f"stabguard: interrupted after 3/8 boards generated; nothing written to "
                             f"{tmp_path / 'train.jsonl'}\n")
    assert not (tmp_path / "train.jsonl").exists()


def test_ctrl_c_in_a_terminal_stops_the_workers_without_tracebacks(tmp_path):
    # Ctrl-C reaches the whole process group: the parent and its pool workers
    command = [sys.executable, "-c", "from stabguard.cli import main; main()", "data", "synth-pcb", "--out", str(tmp_path), "--n", "2000",
               "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (tmp_path / "images/board_0004.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.startswith("stabguard: interrupted after ") and "/2000 boards generated; nothing written to" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and out == ""
    assert not (tmp_path / "train.jsonl").exists()


def test_fast_enough(written):
    assert written["seconds"] < 10  # the brief's target is < 2 s for 48 boards; this catches a blow-up


def test_writes_layout_and_split(written):
    assert written["images"] == 48 and written["train_rows"] + written["val_rows"] == 48
    assert written["val_rows"] == 12
    notes = json.loads(open(written["annotations"]).read())
    assert notes["classes"] == list(DEFECT_CLASSES) and len(notes["boards"]) == 48
    assert Counter(b["split"] for b in notes["boards"]) == {"train": 36, "val": 12}
    assert sum(written["defects"].values()) == sum(len(b["defects"]) for b in notes["boards"])


def test_no_val_file_when_no_val_fraction(tmp_path):
    result = synth_pcb(tmp_path, 3, val_fraction=0)
    assert result["val"] is None and not (tmp_path / "val.jsonl").exists() and result["train_rows"] == 3


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "val_fraction": 1.0}, {"n": 4, "size": 16}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="synth_pcb"):
        synth_pcb(tmp_path, **kwargs)


def _text(content):
    return content if isinstance(content, str) else " ".join(i["text"] for i in content if i["type"] == "text")


def _detection_answers(messages):
    """Assistant replies that follow a request for boxes (an instruction or the "where" follow-up)."""
    asks = set(INSTRUCTIONS) | {WHERE_FOLLOW_UP}
    return [b["content"] for a, b in zip(messages, messages[1:]) if a["role"] == "user" and _text(a["content"]) in asks]


def test_rows_validate_and_answers_match_ground_truth(written):
    rows = [json.loads(line) for split in ("train", "val") for line in open(written[split])]
    for split in ("train", "val"):
        ds = ConversationDataset(written[split])
        assert len(ds) == written[f"{split}_rows"]
        sample = ds[0]
        assert [im.size for im in sample["images"]] == [(256, 256)]
    for row in rows:
        (first,) = _detection_answers(row["messages"])  # every row teaches the detection format once
        if row["defects"]:
            count, listed = first.split("\n", 1)
            assert count.startswith(f"Found {len(row['defects'])} defect")
            assert json.loads(listed) == row["defects"]
        else:
            assert first == "No defects found."
    assert any(sum(m["role"] == "assistant" for m in row["messages"]) == 2 for row in rows)
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    first_user = [next(m for m in row["messages"] if m["role"] == "user") for row in rows]
    assert len({item["text"] for m in first_user for item in m["content"] if item["type"] == "text"}) >= 3


def test_task_styles_answer_whether_how_many_and_which(written):
    rows = [json.loads(line) for split in ("train", "val") for line in open(written[split])]
    seen = set()
    for row in rows:
        msgs = row["messages"][1:] if row["messages"][0]["role"] == "system" else row["messages"]
        question = _text(msgs[0]["content"])
        style = next((s for s, qs in QUESTIONS.items() if question in qs), None)
        if style is None:
            assert question in INSTRUCTIONS
            continue
        seen.add(style)
        reply, labels = msgs[1]["content"], [d["label"] for d in row["defects"]]
        assert msgs[2]["content"] == WHERE_FOLLOW_UP  # "where" always follows
        if style == "count":
            assert reply.startswith(f"{len(labels)} defect")
        elif style == "presence":
            assert reply.startswith("Yes") == bool(labels)
        elif labels:
            assert set(reply.removeprefix("Defect types: ").rstrip(".").split(", ")) == set(labels)
    assert seen == set(QUESTIONS)


def test_readme_describes_the_set(written):
    text = open(written["readme"]).read()
    assert "stabguard data synth-pcb" in text and "--n 48 --seed 0" in text
    assert f"({written['val_rows']} rows)" in text and "bbox_2d" in text
    for label, count in written["defects"].items():
        assert f"| {label} | {count} |" in text


def _boards(n, seed=7, size=256):
    return [make_board(np.random.default_rng([seed, i]), size) for i in range(n)]


@pytest.mark.parametrize("size", [256, 160])
def test_boxes_inside_image_and_on_the_changed_pixels(size):
    for board in _boards(24, size=size):
        assert set(np.unique(board.image)) <= {0, 255}
        assert 0.04 < (board.template > 0).mean() < 0.6  # reads as a board: neither empty nor solid
        assert len(board.defects) <= 3
        changed = board.image != board.template
        covered = np.zeros_like(changed)
        for d in board.defects:
            x1, y1, x2, y2 = d["bbox_2d"]
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            inside = changed[y1:y2, x1:x2]
            assert inside.any(), d  # every box holds its defect
            ys, xs = np.nonzero(inside)
            assert abs((x1 + x2) / 2 - (x1 + (xs.min() + xs.max() + 1) / 2)) <= 1.5, d  # centred on it
            assert abs((y1 + y2) / 2 - (y1 + (ys.min() + ys.max() + 1) / 2)) <= 1.5, d
            added = board.image[y1:y2, x1:x2][inside] == 255
            assert added.all() if d["label"] not in REMOVES_COPPER else not added.any(), d
            covered[y1:y2, x1:x2] = True
        assert not (changed & ~covered).any()  # and no defect is left without a box


def _components(mask):
    """Number of 8-connected regions: min-label propagation with pointer jumping (no scipy here)."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(h * w).reshape(h, w), h * w)
    while True:
        pad = np.pad(lab, 1, constant_values=h * w)
        new = lab
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, pad[dy:dy + h, dx:dx + w])
        new = np.where(mask, np.append(new.ravel(), h * w)[np.where(mask, new, h * w)], h * w)
        if (new == lab).all():
            return len(np.unique(lab[mask]))
        lab = new


# What each defect does to the number of separate copper regions: that is what makes it that defect.
REGION_CHANGE = {"open": 1, "short": -1, "mousebite": 0, "spur": 0, "spurious copper": 1, "pin-hole": 0}


def test_each_defect_changes_connectivity_as_its_class_says():
    seen = set()
    for board in _boards(120, seed=5, size=128):
        if len(board.defects) != 1:
            continue
        label = board.defects[0]["label"]
        seen.add(label)
        change = _components(board.image > 0) - _components(board.template > 0)
        assert change == REGION_CHANGE[label], board.defects
        if label == "pin-hole":  # a hole is a new region of background inside the copper
            assert _components(board.image == 0) - _components(board.template == 0) == 1
    assert seen == set(DEFECT_CLASSES)


def test_every_class_appears_over_many_boards():
    boards = _boards(60, seed=11)
    counts = Counter(d["label"] for b in boards for d in b.defects)
    assert set(counts) == set(DEFECT_CLASSES), counts
    assert Counter(len(b.defects) for b in boards).keys() == {0, 1, 2, 3}


def test_cli_synth_pcb(tmp_path):
    result = CliRunner().invoke(command, ["synth-pcb", "--out", str(tmp_path), "--n", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "generated 4 boards in " in result.output and "wrote 4 images" in result.output and "(3 rows)" in result.output and "(1 rows)" in result.output
    assert len(ConversationDataset(tmp_path / "train.jsonl")) == 3
    bad = CliRunner().invoke(command, ["synth-pcb", "--out", str(tmp_path), "--n", "0"])
    assert bad.exit_code == 2 and "--n" in bad.output
