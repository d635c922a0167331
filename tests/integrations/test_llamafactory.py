"""stabguard.integrations.llamafactory: ``stabguard llamafactory train config.yaml``, tiny Qwen3-VL, CPU.

Runs in the tox env ``llamafactory`` (LLaMA-Factory's latest release beside stabguard); skipped where
LLaMA-Factory is not installed. About a minute: LLaMA-Factory's start-up is most of it.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("llamafactory")

import yaml  # noqa: E402
from support_frameworks import (  # noqa: E402
    GUARDS, PLUGINS, STEPS, assert_guarded, mask_findings, rows, seam_present, with_image_tags,
)
from support_launch import launch  # noqa: E402

from stabguard.integrations import llamafactory as integration  # noqa: E402


def config(tmp_path: Path, assets, stabguard: dict | None) -> Path:
    """The tiny boards as a sharegpt dataset with its dataset_info.json, and an SFT config for them."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "pcb.json").write_text(json.dumps([with_image_tags(assets, r) for r in rows(assets)]))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    (data / "dataset_info.json").write_text(json.dumps({"pcb": {
        "file_name": "pcb.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": tags}}))
    cfg = {"model_name_or_path": str(assets["model"]), "image_max_pixels": 65536, "stage": "sft", "do_train": True,
           "finetuning_type": "lora", "lora_rank": 8, "lora_target": "q_proj,v_proj", "dataset_dir": str(data),
           "dataset": "pcb", "template": "qwen3_vl_nothink", "cutoff_len": 1024, "overwrite_cache": True,
           "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "output_dir": str(tmp_path / "out"),
           "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "report_to": "none",
           "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
           "max_steps": STEPS, "lr_scheduler_type": "linear", "warmup_steps": 0, "bf16": False, "fp16": False,
           "seed": 0}
    if stabguard is not None:
        cfg["stabguard"] = stabguard
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stabguard_llamafactory(tmp_path: Path, cfg: Path, *overrides: str, check: bool = True):
    cmd = ["env", "CUDA_VISIBLE_DEVICES=", "HF_DATASETS_OFFLINE=1", f"HF_HOME={tmp_path / 'hf'}",
           str(Path(sys.executable).with_name("stabguard")), "llamafactory", "train", str(cfg), *overrides]
    return launch(cmd, what="stabguard llamafactory train", cwd=tmp_path, check=check)


def test_llamafactory_train_skips_a_nan_step_and_audits_llamafactory_s_labels(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": GUARDS})
    stabguard_llamafactory(tmp_path, cfg)
    events = assert_guarded(tmp_path / "out", tmp_path / "out" / "adapter_model.safetensors")
    assert not mask_findings(events), "LLaMA-Factory's labels: the replies, each <|im_end|> and its newline"


def test_a_guard_stop_exits_3_and_an_override_reaches_the_settings(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": {"faults": {"nan_grad_at": [2]}}})
    done = stabguard_llamafactory(tmp_path, cfg, "stabguard.guards.nonfinite.max_consecutive=1", check=False)
    assert done.returncode == 3 and "stabguard: STOPPED at step 2" in done.stdout, done.stdout[-3000:]


def test_bad_settings_are_refused_by_key_before_any_model_loads(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"guards": {"nosuch": {}}})
    done = stabguard_llamafactory(tmp_path, cfg, check=False)
    assert done.returncode == 2 and "stabguard.guards.nosuch: unknown guard; known guards:" in done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("llamafactory").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from llamafactory {version} (used for: {why})"
