"""stabguard.integrations.ms_swift: ``swift sft ... --external_plugins <stabguard's file>``, tiny Qwen3-VL, CPU.

Runs in the tox env ``ms-swift`` (ms-swift's latest release beside stabguard); skipped where ms-swift is
not installed. About a minute: ms-swift's start-up is most of it.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("swift")

from support_frameworks import (  # noqa: E402
    GUARDS, PLUGINS, STEPS, assert_guarded, mask_findings, rows, seam_present, with_image_tags, write_jsonl,
)
from support_launch import launch  # noqa: E402

from stabguard.integrations import ms_swift as integration  # noqa: E402


def swift_sft(tmp_path: Path, assets, env: dict[str, str], check: bool = True):
    data = write_jsonl(tmp_path / "train.jsonl", [with_image_tags(assets, r) for r in rows(assets)])
    plugin = subprocess.run([sys.executable, "-m", "stabguard.integrations.ms_swift"], capture_output=True,
                            text=True, check=True).stdout.strip()  # as the documented flag prints it
    args = ["--model", assets["model"], "--model_type", "qwen3_vl", "--template", "qwen3_vl", "--use_hf", "true",
            "--dataset", data, "--split_dataset_ratio", "0", "--tuner_type", "lora", "--lora_rank", "8",
            "--lora_alpha", "16", "--target_modules", "all-linear", "--torch_dtype", "float32", "--attn_impl", "sdpa",
            "--max_length", "512", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_scheduler_type", "linear", "--warmup_steps", "0",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS), "--eval_strategy", "no",
            "--report_to", "none", "--dataloader_num_workers", "0", "--check_model", "false", "--seed", "0",
            "--output_dir", tmp_path / "out", "--external_plugins", plugin]
    cmd = ["env", *(f"{k}={v}" for k, v in env.items()), "MODELSCOPE_OFFLINE=1", "HF_DATASETS_OFFLINE=1",
           "CUDA_VISIBLE_DEVICES=", f"MODELSCOPE_CACHE={tmp_path / 'ms'}", str(Path(sys.executable).with_name("swift")),
           "sft", *map(str, args)]
    return launch(cmd, what="swift sft with stabguard's external plugin", cwd=tmp_path, check=check)


def run_folder(tmp_path: Path) -> Path:
    """ms-swift writes into a versioned folder under output_dir (v0-<time>)."""
    (folder,) = (tmp_path / "out").glob("v*-*")
    return folder


def test_swift_sft_skips_a_nan_step_and_audits_ms_swift_s_labels(tmp_path, tiny_qwen_assets):
    env = {"STABGUARD_GUARDS": json.dumps(GUARDS), "STABGUARD_PLUGINS": ",".join(PLUGINS)}
    swift_sft(tmp_path, tiny_qwen_assets, env)
    out = run_folder(tmp_path)
    events = assert_guarded(out, out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert not mask_findings(events), "ms-swift's labels: the replies, each <|im_end|> and its newline"


def test_a_guard_stop_makes_swift_sft_exit_3(tmp_path, tiny_qwen_assets):
    """Without stabguard a STOP would leave `swift sft` exiting 0, as if the run had trained."""
    guards = {"nonfinite": {"max_consecutive": 1}, "faults": {"nan_grad_at": [2]}}
    env = {"STABGUARD_GUARDS": json.dumps(guards), "STABGUARD_PLUGINS": ",".join(PLUGINS)}
    done = swift_sft(tmp_path, tiny_qwen_assets, env, check=False)
    assert done.returncode == 3, done.stdout[-3000:]
    assert "stabguard: STOPPED at step 2" in done.stdout


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("swift").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from swift {version} (used for: {why})"
