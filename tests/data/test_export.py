"""stabguard/data/export.py: the same conversations in each framework's dataset format; a bad row stops the
export by file:line with nothing written. Each format is read by its framework's own command in
tests/integrations/ (the tox envs), through support_frameworks' with_image_tags / with_absolute_images."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from stabguard.cli import main
from stabguard.data.export import export


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_each_format_keeps_every_turn_and_image_in_order(tiny_assets, tmp_path):
    src = tiny_assets["train"]
    original = rows_of(src)
    images = [[item["image"] for m in r["messages"] if isinstance(m["content"], list) for item in m["content"]
               if item["type"] == "image"] for r in original]
    (swift,) = export(src, "ms-swift", tmp_path / "swift")
    tagged = rows_of(swift)
    assert len(tagged) == len(original) and all(r["images"] for r in tagged)
    for row, refs in zip(tagged, images):
        assert [p.rsplit("/", 1)[-1] for p in row["images"]] == [r.rsplit("/", 1)[-1] for r in refs]
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(refs), "one tag per image"
        assert all((src.parent / r).resolve().samefile(p) for r, p in zip(refs, row["images"])), "absolute paths"
    data, info = export(src, "llamafactory", tmp_path / "lf", name="pcb")
    assert json.loads(data.read_text()) == tagged, "LLaMA-Factory's rows are ms-swift's, as a JSON list"
    assert json.loads(info.read_text())["pcb"]["file_name"] == "pcb.json"
    (axolotl,) = export(src, "axolotl", tmp_path / "axo")
    typed = rows_of(axolotl)
    assert [r["id"] for r in typed] == [r.get("id") for r in original]
    assert all(isinstance(m["content"], list) for r in typed for m in r["messages"]), "one column type per key"


def test_a_bad_row_is_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                   '{"messages": [{"role": "robot", "content": "x"}]}\n')
    ran = CliRunner().invoke(main, ["data", "export", str(src), "--to", "ms-swift", "--out", str(tmp_path / "out")])
    assert ran.exit_code == 1 and f"{src}:2: messages[0].role" in ran.output, ran.output
    assert not (tmp_path / "out").exists()


def test_a_second_dataset_joins_llamafactory_s_dataset_info(tiny_assets, tmp_path):
    export(tiny_assets["train"], "llamafactory", tmp_path, name="a")
    export(tiny_assets["train"], "llamafactory", tmp_path, name="b")
    assert sorted(json.loads((tmp_path / "dataset_info.json").read_text())) == ["a", "b"]


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="--to 'unsloth': not one of llamafactory, ms-swift, axolotl"):
        export("x.jsonl", "unsloth", "out")
