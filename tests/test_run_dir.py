"""stabguard/run_dir.py (``stabguard check RUN_DIR``): a plain Hugging Face run directory, checked without a
recipe, through the CLI: its saved arguments (a real ``training_args.bin``), this machine's stack, its history."""

from __future__ import annotations

import json
import os
import shutil

import torch
import transformers
from click.testing import CliRunner
from support_runs import spiky_history, write_hf_run

from stabguard.cli.check import command


def save_args(folder, **fields):
    """``training_args.bin`` as the Trainer saves it (``torch.save`` of its TrainingArguments)."""
    args = transformers.TrainingArguments(output_dir=str(folder), use_cpu=True, report_to="none")
    for name, value in fields.items():
        setattr(args, name, value)  # fp16 on a CPU machine: set after the checks of __post_init__
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(args, folder / "training_args.bin")


def check(folder, *options):
    result = CliRunner().invoke(command, [str(folder), "--json", *options])
    return result.exit_code, json.loads(result.output)


def by_check(report, name):
    return [f for f in report["findings"] if f["check"] == name]


def test_an_fp16_qwen_run_that_went_nan_fails_with_both_named(tmp_path):
    write_hf_run(tmp_path, spiky_history(nan_steps=(150, 155)))
    save_args(tmp_path / "checkpoint-300", fp16=True)
    (tmp_path / "checkpoint-300" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Qwen/Qwen3-VL-8B-Instruct", "target_modules": ["q_proj"]}))
    code, report = check(tmp_path, "--probe")
    assert code == 1
    (stack,) = [f for f in by_check(report, "stack") if f["level"] == "error"]
    assert "fp16 on a Qwen checkpoint" in stack["message"] and any("bf16 = true" in d for d in stack["details"])
    (nan,) = [f for f in by_check(report, "history") if f["level"] == "error"]
    assert "non-finite grad norm at steps 150–155" in nan["message"]
    (probe,) = by_check(report, "probe")
    assert probe["level"] == "info" and "stabguard check RECIPE --probe" in probe["message"]


def test_a_healthy_bf16_run_passes_and_a_deepspeed_pitfall_in_its_arguments_is_named(tmp_path):
    clean = tmp_path / "clean"
    write_hf_run(clean, spiky_history(spike=(0, 0), nan_steps=()))
    save_args(clean, bf16=True)
    code, report = check(clean)
    assert code == 0, [f for f in report["findings"] if f["level"] == "error"]
    assert by_check(report, "stack")[0]["level"] == "ok"

    zero2 = tmp_path / "zero2"
    write_hf_run(zero2, spiky_history(spike=(0, 0), nan_steps=()))
    save_args(zero2, bf16=True, deepspeed={"zero_optimization": {"stage": 2, "overlap_comm": True}})
    code, report = check(zero2)
    assert code == 1 and any("overlap_comm" in f["message"] for f in by_check(report, "engine"))


def test_a_folder_that_is_no_run_says_what_it_lacks(tmp_path):
    result = CliRunner().invoke(command, [str(tmp_path)])
    assert result.exit_code == 2 and f"{tmp_path} is a folder but not a Hugging Face run directory" in result.output


def test_every_checkpoint_is_verified_and_listed_good_or_bad(tmp_path):
    from stabguard.checkpoints import write_manifest

    write_hf_run(tmp_path, spiky_history(spike=(0, 0), nan_steps=()))
    for step in (100, 200, 300):
        save_args(tmp_path / f"checkpoint-{step}", bf16=True)
        shutil.copy(tmp_path / "trainer_state.json", tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "stabguard_state.json").write_text('{"manifest": true}')
    for step in (200, 300):
        write_manifest(tmp_path / f"checkpoint-{step}")
    os.truncate(tmp_path / "checkpoint-300" / "training_args.bin", 100)
    (tmp_path / "checkpoint-400").mkdir()  # a kill in the middle of a save
    (tmp_path / "checkpoint-400" / "optimizer.pt").write_bytes(b"PK\x03\x04")
    code, report = check(tmp_path)
    found = {f["values"]["status"]: f for f in by_check(report, "checkpoints")}
    assert code == 1 and found.keys() == {"verified", "incomplete", "damaged"}
    assert found["verified"]["level"] == "ok" and found["verified"]["values"]["folders"] == ["checkpoint-200"]
    assert found["incomplete"]["values"]["folders"] == ["checkpoint-100", "checkpoint-400"]
    assert found["damaged"]["level"] == "error"
    (damaged,) = found["damaged"]["details"]
    assert damaged.startswith("checkpoint-300: training_args.bin is 100 B, the manifest says ")
