"""ConversationDataset: every schema problem reported at once by file:line and key; corrupt images named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from stabguard.data import ConversationDataset, DataError, check_images, check_rows
from stabguard.data.jsonl import write_jsonl


def _png(path, size=(32, 24), color=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write(path, lines):
    """Rows may be dicts (dumped) or raw strings (written as they are, for broken JSON)."""
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def _row(image="img/a.png", question="Inspect this PCB.", answer="No defects found."):
    user = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_valid_rows_give_contract_samples(tmp_path):
    _png(tmp_path / "img/a.png", color=(255, 0, 0))
    _png(tmp_path / "img/b.png", size=(16, 16))
    two = _row()
    two["messages"][0]["content"].append({"type": "image", "image": "img/b.png"})
    two["defects"] = []
    path = _write(tmp_path / "d.jsonl", [_row(), "", two])

    ds = ConversationDataset(path)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["id"] == f"{path}:1" and second["id"] == f"{path}:3"  # the blank line still counts
    assert set(second) == {"id", "messages", "images"}
    assert second["messages"] == two["messages"]
    assert [im.size for im in second["images"]] == [(32, 24), (16, 16)]
    assert all(im.mode == "RGB" for im in second["images"])
    assert first["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_text_only_samples_get_a_placeholder_image_only_when_asked(tmp_path):
    _png(tmp_path / "img/a.png")
    text_only = {"messages": [{"role": "system", "content": "You inspect PCBs."},
                              {"role": "user", "content": "Is copper conductive?"},
                              {"role": "assistant", "content": "Yes."}]}
    path = _write(tmp_path / "d.jsonl", [_row(), text_only])
    assert ConversationDataset(path)[1]["images"] == [], "off by default: the row as written"
    ds = ConversationDataset(path, text_only_image=True)
    with_image, placed = ds[0], ds[1]
    assert len(with_image["images"]) == 1 and with_image["messages"] == _row()["messages"], "rows with images: as written"
    assert len(placed["images"]) == 1 and placed["images"][0].size == (64, 64)
    assert placed["messages"][0] == text_only["messages"][0], "the system turn is left alone"
    assert placed["messages"][1]["content"] == [{"type": "image", "image": "stabguard:placeholder"},
                                                {"type": "text", "text": "Is copper conductive?"}]
    assert placed["messages"][2] == text_only["messages"][2], "the supervised answer is unchanged"


def test_sample_messages_are_copies(tmp_path):
    _png(tmp_path / "img/a.png")
    ds = ConversationDataset(_write(tmp_path / "d.jsonl", [_row()]))
    ds[0]["messages"][0]["content"].clear()
    assert len(ds[0]["messages"][0]["content"]) == 2


BROKEN = [
    ('{"messages": [', "invalid JSON"),
    ({"messages": []}, "messages: must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role: must be one of system, user, assistant; got tool"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]},
     "messages[1].role: a system turn may only come first"),
    (_row(image="boards/x.png"), "messages[0].content[0].image: file not found: boards/x.png"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages: no assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                   {"role": "assistant", "content": "y"}]},
     "messages[0].content[0].type: must be 'text' or 'image', got video"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]},
                   {"role": "assistant", "content": 7}]},
     "messages[0].content[0].text: must be a string, got 3"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "messages[0].content: missing"),
    ([1, 2], "row: must be a JSON object"),
]


def test_every_schema_problem_reported_at_once_with_file_line_and_key(tmp_path):
    _png(tmp_path / "img/a.png")
    path = _write(tmp_path / "bad.jsonl", [_row()] + [line for line, _ in BROKEN])

    with pytest.raises(DataError) as info:
        ConversationDataset(path)
    message = str(info.value)
    for lineno, (_, expected) in enumerate(BROKEN, start=2):
        assert f"{path}:{lineno}: {expected}" in message
    assert f"{path}:1:" not in message  # the good row is not blamed
    assert f"{len(BROKEN) + 1} problem(s) in {path}" in message  # row 9 has two problems
    assert isinstance(info.value, ValueError)


def test_max_errors_caps_the_listing(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["{"] * 7)
    with pytest.raises(DataError) as info:
        ConversationDataset(path, max_errors=2)
    message = str(info.value)
    assert f"{path}:2: invalid JSON" in message and f"{path}:3:" not in message
    assert "7 problem(s)" in message and "and 5 more" in message


def test_check_rows_returns_problems_without_raising(tmp_path):
    _png(tmp_path / "img/a.png")
    path = _write(tmp_path / "d.jsonl", [_row(), _row(image="nope.png"), "not json"])
    problems = check_rows(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3"]
    assert check_rows(path, limit=1) == []
    (missing,) = check_rows(tmp_path / "missing.jsonl")
    assert missing.startswith(f"{tmp_path / 'missing.jsonl'}: file not found; make it first: stabguard data synth-pcb")
    assert check_rows(_write(tmp_path / "empty.jsonl", [""])) == [f"{tmp_path / 'empty.jsonl'}: no rows"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_sample_and_path(tmp_path, damage):
    _png(tmp_path / "img/a.png")
    _png(tmp_path / "img/bad.png", size=(64, 64))
    bad = tmp_path / "img/bad.png"
    data = b"\x00not a png at all" * 20 if damage == "garbage" else bad.read_bytes()[:60]
    bad.write_bytes(data)
    path = _write(tmp_path / "d.jsonl", [_row(), _row(image="img/bad.png")])

    ds = ConversationDataset(path)  # existence is checked up front; decoding happens on access
    assert ds[0]["images"][0].size == (32, 24)
    with pytest.raises(DataError) as info:
        ds[1]
    assert f"{path}:2" in str(info.value) and "img/bad.png" in str(info.value)
    problems = check_images(path, sample=None)
    assert len(problems) == 1 and f"{path}:2" in problems[0] and "img/bad.png" in problems[0]


def test_check_images_samples_deterministically(tmp_path):
    rows = []
    for i in range(10):
        _png(tmp_path / f"img/{i}.png")
        rows.append(_row(image=f"img/{i}.png"))
    path = _write(tmp_path / "d.jsonl", rows)
    (tmp_path / "img/3.png").write_bytes(b"broken")
    (tmp_path / "img/7.png").write_bytes(b"broken")
    assert len(check_images(path, sample=None)) == 2
    assert check_images(path, sample=4, seed=1) == check_images(path, sample=4, seed=1)
    assert len(check_images(path, sample=4, seed=1)) <= 2


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        ConversationDataset(tmp_path / "missing.jsonl")


def test_check_rows_and_images_report_progress(tmp_path):
    _png(tmp_path / "img/a.png")
    path = _write(tmp_path / "d.jsonl", [_row()] * 1200)
    seen = []
    assert check_rows(path, progress=lambda *a: seen.append(a)) == []
    assert seen == [("rows checked", 500, 1200), ("rows checked", 1000, 1200), ("rows checked", 1200, 1200)]
    seen.clear()
    assert check_images(path, progress=lambda *a: seen.append(a)) == []
    assert seen[-2:] == [("rows scanned for images", 1200, 1200), ("images decoded", 1, 1)]


def test_write_jsonl_replaces_a_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": 3}, {"b": object()}])  # fails half-way through the rows
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n' and [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]
