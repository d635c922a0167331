"""``stabguard eval`` end to end on the tiny random Qwen3-VL: few samples, few tokens."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from support import tiny_recipe, write_recipe

from stabguard import eval as sg_eval
from stabguard.cli.eval import command
from stabguard.data.synth import answer
from stabguard.models import peft_quietly


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    """A recipe on the tiny model with val data, and a saved adapter whose B matrices are not zero
    (a freshly initialised LoRA is the identity, so it could not show the adapter is applied)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    root = tmp_path_factory.mktemp("eval")
    recipe = tiny_recipe(tiny_assets, root / "out")
    recipe["data"]["val"] = str(tiny_assets["train"])  # 6 rows: enough for two batches
    path = write_recipe(root / "recipe.toml", recipe)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    with peft_quietly():
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 2.0)
    model.save_pretrained(root / "out" / "checkpoint-3")  # a stopped run: only a checkpoint holds it
    return {"recipe": path, "root": root, "out": root / "out", "val": tiny_assets["train"]}


def test_trained_and_untrained_generate_parse_and_score(setup):
    kwargs = {"limit": 3, "batch_size": 2, "max_new_tokens": 6}
    trained = sg_eval.evaluate(setup["recipe"], **kwargs)
    base = sg_eval.evaluate(setup["recipe"], untrained=True, **kwargs)
    assert "checkpoint-3" in trained["model"] and "untrained" in base["model"]
    for result, name in ((trained, "eval.json"), (base, "eval_untrained.json")):
        assert result["written"] == str(setup["out"] / name)
        saved = json.loads((setup["out"] / name).read_text())
        assert saved["metrics"] == result["metrics"] and len(saved["samples"]) == 3
        m = result["metrics"]
        assert m["samples"] == 3 and m["answers_parsed"] == 0.0  # a random model writes no format
        assert m["count_accuracy"] == 0.0 or any(not s["truth"] for s in saved["samples"])
        assert all(isinstance(s["answer"], str) for s in saved["samples"])
    assert [s["answer"] for s in trained["samples"]] != [s["answer"] for s in base["samples"]]


def test_batching_does_not_change_greedy_answers(setup):
    one = sg_eval.evaluate(setup["recipe"], untrained=True, limit=3, batch_size=1, max_new_tokens=5,
                           out=setup["root"] / "a.json")
    three = sg_eval.evaluate(setup["recipe"], untrained=True, limit=3, batch_size=3, max_new_tokens=5,
                             out=setup["root"] / "b.json")
    assert [s["answer"] for s in one["samples"]] == [s["answer"] for s in three["samples"]]


def test_perfect_answers_give_perfect_scores(setup, monkeypatch):
    rows = [json.loads(line) for line in open(setup["val"])]

    def oracle(model, processor, samples, prompt, max_new_tokens):
        return [answer(rows[int(s["id"].rsplit(":", 1)[1]) - 1]["defects"]) for s in samples]

    monkeypatch.setattr(sg_eval, "generate_answers", oracle)
    m = sg_eval.evaluate(setup["recipe"], untrained=True, out=setup["root"] / "oracle.json")["metrics"]
    assert m["samples"] == len(rows)
    assert m["answers_parsed"] == m["count_accuracy"] == m["type_accuracy"] == 1.0
    assert m["box_iou"] in (None, 1.0) and m["recall_50"] in (None, 1.0)


def test_cli_prints_the_table_and_writes_eval_json(setup):
    out = setup["root"] / "cli.json"
    result = CliRunner().invoke(command, [str(setup["recipe"]), "--untrained", "--limit", "2",
                                          "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for label in ("count accuracy", "defect-type accuracy", "mean box IoU", "answers in the format"):
        assert label in result.output
    written = json.loads(out.read_text())
    assert written["metrics"]["samples"] == 2 and written["parameters"] > 0
    assert written["random_tiny_model"] is False and "expected score" not in result.output  # no model.tiny


def test_a_random_tiny_model_s_zero_is_said_to_be_expected(setup, tmp_path):
    recipe = setup["recipe"].read_text().replace("[model]\n", '[model]\ntiny = { seed = 0 }\n', 1)
    path = tmp_path / "tiny.toml"
    path.write_text(recipe)
    result = CliRunner().invoke(command, [str(path), "--untrained", "--limit", "1", "--max-new-tokens", "2",
                                          "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert "M-parameter random tiny Qwen3-VL (model.tiny)" in result.output
    assert "0% is its expected score" in result.output


def test_cli_missing_adapter_and_missing_val_are_clear(setup, tmp_path):
    result = CliRunner().invoke(command, [str(setup["recipe"]), "--adapter", str(tmp_path), "--limit", "1"])
    assert result.exit_code == 2 and "no LoRA adapter" in result.output and str(tmp_path) in result.output
    text = setup["recipe"].read_text()
    no_val = tmp_path / "r.toml"
    no_val.write_text("\n".join(line for line in text.splitlines() if not line.startswith("val = ")))
    result = CliRunner().invoke(command, [str(no_val), "--untrained"])
    assert result.exit_code == 2 and "data.val is not set" in result.output


def test_rows_without_ground_truth_are_listed_not_scored(setup, tmp_path):
    data = setup["val"].parent / "without_truth.jsonl"  # beside the images its rows point at
    rows = [json.loads(line) for line in open(setup["val"])]
    first = {k: v for k, v in rows[0].items() if k != "defects"}  # falls back to the answer in the row
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(first) + "\n" + json.dumps(chat) + "\n")
    result = sg_eval.evaluate(setup["recipe"], untrained=True, data=data, max_new_tokens=2, out=tmp_path / "e.json")
    assert result["metrics"]["samples"] == 1 and result["without_ground_truth"] == [f"{data}:2"]
