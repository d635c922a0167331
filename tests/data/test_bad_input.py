"""Every bad-input case of the data issue, under policy "error" (file:line and why) and "skip" (counted,
listed as events, summarised at the end of a run)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from support import tiny_recipe, write_recipe

from stabguard.data import ConversationDataset, DataError
from stabguard.events import EventLog, read_events


def _png(path, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def _row(image="img/ok.png", question="Inspect this PCB.", answer="No defects found.", role="user"):
    user = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    return {"messages": [{"role": role, "content": user}, {"role": "assistant", "content": answer}]}


# (line written, reason expected in the message); each is one bad row.
CASES = {
    "missing image": (_row(image="img/nope.png"), "messages[0].content[0].image: file not found: img/nope.png"),
    "zero-size image": (_row(image="img/empty.png"), "messages[0].content[0].image: empty file (0 bytes)"),
    "unknown role": (_row(role="robot"), "messages[0].role: must be one of system, user, assistant; got robot"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "hello"}]}, "messages: no assistant turn"),
    "empty text item": (_row(question="  "), "messages[0].content[1].text: empty text"),
    "empty reply": (_row(answer=""), "messages[1].content: empty text"),
    "path leaves the directory": (_row(image="../outside.png"), "image path leaves the dataset directory"),
    "absolute path": (_row(image="/etc/hostname"), "image path leaves the dataset directory"),
    "malformed JSON": ('{"messages": [{"role": "user"', "invalid JSON"),
}


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "set"
    _png(data / "img/ok.png")
    (data / "img/empty.png").write_bytes(b"")
    _png(tmp_path / "outside.png")  # exists, so only the escape can be the reason
    (data / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return data


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_error_policy_names_file_line_and_reason(folder, case):
    line, reason = CASES[case]
    path = _write(folder / "d.jsonl", [_row(), line])
    with pytest.raises(DataError) as info:
        ConversationDataset(path)
    assert f"{path}:2: " in str(info.value) and reason in str(info.value)
    assert f"{path}:1:" not in str(info.value)


def test_corrupt_image_error_policy_names_the_sample_on_access(folder):
    path = _write(folder / "d.jsonl", [_row(), _row(image="img/corrupt.png")])
    ds = ConversationDataset(path)
    with pytest.raises(DataError, match=rf"{path}:2: image img/corrupt.png .* cannot be decoded"):
        ds[1]


def test_skip_policy_counts_lists_and_keeps_the_good_rows(folder):
    lines = [_row()] + [line for line, _ in CASES.values()] + [_row(image="img/corrupt.png"), _row()]
    path = _write(folder / "d.jsonl", lines)
    events = EventLog()
    ds = ConversationDataset(path, policy="skip", events=events)
    assert len(ds) == 3  # the two good rows and the corrupt image (found only when decoded)
    assert len(ds.skipped) == len(CASES)
    for (_, reason), problem in zip(CASES.values(), ds.skipped):
        assert reason in problem
    served = [ds[i]["id"] for i in range(len(ds))]  # the corrupt row gives way to the next good one
    assert served == [f"{path}:1", f"{path}:{len(lines)}", f"{path}:{len(lines)}"]
    skipped = events.of_kind("skipped_row")
    assert len(skipped) == len(CASES) + 1 and len(ds.skipped) == len(CASES) + 1
    assert skipped[-1]["values"]["sample"] == f"{path}:{len(lines) - 1}" and "cannot be decoded" in skipped[-1]["message"]
    assert f"{len(CASES) + 1} row(s) skipped" in ds.summary()


def test_skip_policy_with_nothing_left_is_still_an_error(folder):
    path = _write(folder / "d.jsonl", [CASES["unknown role"][0], "{"])
    with pytest.raises(DataError, match="2 problem"):
        ConversationDataset(path, policy="skip")
    only_corrupt = ConversationDataset(_write(folder / "c.jsonl", [_row(image="img/corrupt.png")]), policy="skip")
    with pytest.raises(DataError, match="no row left whose images decode"):
        only_corrupt[0]


def test_a_run_with_bad_rows_skips_them_and_says_so(tiny_assets, tmp_path, capsys):
    from stabguard.runner import run

    rows = tiny_assets["train"].read_text().splitlines()
    train = tiny_assets["train"].parent / "with_bad_rows.jsonl"  # beside the images its rows point at
    train.write_text("\n".join(rows[:2] + ['{"messages": [', json.dumps(CASES["unknown role"][0])]) + "\n")
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 1})
    recipe["data"].update(train=str(train), bad_rows="skip")
    result = run(write_recipe(tmp_path / "r.toml", recipe))
    assert result.ok and result.global_step == 1
    skipped = [e for e in read_events(tmp_path / "out" / "events.jsonl") if e["kind"] == "skipped_row"]
    assert [e["values"]["sample"] for e in skipped] == [f"{train}:3", f"{train}:4"]
    assert f"{train}: 2 row(s) skipped" in capsys.readouterr().err
