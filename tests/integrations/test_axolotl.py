"""stabguard.integrations.axolotl: ``axolotl train config.yml`` with the plugin, on the tiny Qwen3-VL, on CPU.

Runs in the tox env ``axolotl`` (Axolotl's latest release beside stabguard); skipped where Axolotl is not
installed. About a minute: Axolotl's start-up is most of it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl")

import yaml  # noqa: E402
from support_frameworks import (  # noqa: E402
    GUARDS, PLUGINS, STEPS, assert_guarded, mask_findings, rows, seam_present, with_absolute_images, write_jsonl,
)
from support_launch import launch  # noqa: E402

from stabguard.events import read_events  # noqa: E402
from stabguard.integrations import axolotl as integration  # noqa: E402


def config(tmp_path: Path, assets, stabguard: dict | None, chat_template: str = "qwen2_vl") -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", [with_absolute_images(assets, r) for r in rows(assets)])
    cfg = {
        "base_model": str(assets["model"]), "processor_type": "AutoProcessor", "chat_template": chat_template,
        "skip_prepare_dataset": True, "remove_unused_columns": False, "sample_packing": False,
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "val_set_size": 0, "sequence_len": 2048,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS, "num_epochs": 2,
        "optimizer": "adamw_torch", "learning_rate": 1e-3, "lr_scheduler": "linear", "warmup_steps": 0,
        "max_grad_norm": 1.0, "bf16": False, "fp16": False, "tf32": False, "flash_attention": False,
        "gradient_checkpointing": False, "output_dir": str(tmp_path / "out"), "logging_steps": 1,
        "save_strategy": "no", "seed": 0,
        "plugins": ["stabguard.integrations.axolotl.StabguardPlugin"],
    }
    if stabguard is not None:
        cfg["stabguard"] = stabguard
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl_train(tmp_path: Path, cfg: Path, check: bool = True):
    """As a user runs it; `axolotl train` launches `accelerate` by name, so the environment's bin is on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env_path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    cmd = ["env", f"PATH={env_path}", "AXOLOTL_DO_NOT_TRACK=1", "DO_NOT_TRACK=1", "WANDB_MODE=disabled",
           "HF_DATASETS_OFFLINE=1", f"HF_HOME={tmp_path / 'hf'}", str(Path(bin_dir) / "axolotl"), "train", str(cfg)]
    return launch(cmd, what="axolotl train with the stabguard plugin", cwd=tmp_path, check=check)


def test_axolotl_train_skips_a_nan_step_and_audits_axolotl_s_labels(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"plugins": PLUGINS, "guards": GUARDS})
    done = axolotl_train(tmp_path, cfg)
    assert "StabguardAxolotlTrainer" in done.stdout or "stabguard" in done.stdout
    events = assert_guarded(tmp_path / "out", tmp_path / "out" / "adapter_model.safetensors")
    assert not mask_findings(events), "Axolotl's qwen2_vl labels are the assistant replies"


def test_axolotl_s_tokenizer_default_labels_are_caught_before_the_first_update(tmp_path, tiny_qwen_assets):
    """With the model's own template Axolotl has no role boundaries: it trains on the system and user turns
    and the vision markers. The mask guard names the sample and what is supervised, and no step runs."""
    cfg = config(tmp_path, tiny_qwen_assets, {}, chat_template="tokenizer_default")
    done = axolotl_train(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "stabguard: STOPPED at step 1" in done.stdout, done.stdout[-3000:]
    findings = mask_findings(read_events(tmp_path / "out" / "events.jsonl"))
    assert findings and all("labels are not the assistant replies" in f for f in findings)
    assert any("<|vision_start|>" in f for f in findings), "the vision markers are named"


def test_a_bad_guard_option_fails_axolotl_s_config_validation(tmp_path, tiny_qwen_assets):
    cfg = config(tmp_path, tiny_qwen_assets, {"guards": {"nonfinite": {"max_consecutve": 3}}})
    done = axolotl_train(tmp_path, cfg, check=False)
    assert done.returncode != 0 and "stabguard.guards.nonfinite.max_consecutve" in done.stdout
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("owner, name, why", integration.SEAMS)
def test_the_names_the_integration_relies_on_are_there(owner, name, why):
    version = importlib.import_module("axolotl").__version__
    assert seam_present(owner, name), f"{owner}.{name} is gone from axolotl {version} (used for: {why})"
