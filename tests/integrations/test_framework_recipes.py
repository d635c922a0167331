"""recipes/frameworks/: the ZeRO-3 configs of LLaMA-Factory, Axolotl and ms-swift for the 32B PCB run.

No framework needed here: each config's first line is the command that runs it, its ``stabguard`` settings
validate (the recipe they name included), the DeepSpeed JSON it names exists and passes stabguard's
DeepSpeed preflight without an error, and the data command it names exports that framework's format. The
framework's own parser reads each config in its tox env (``test_<framework>.py``:
``test_the_shipped_zero3_config_...``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from stabguard.engine_check import deepspeed_findings
from stabguard.integrations import GuardSettings

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ROOT / "recipes" / "frameworks"
CONFIGS = {"llamafactory": "llamafactory_pcb_qwen3vl_zero3.yaml", "axolotl": "axolotl_pcb_qwen3vl_zero3.yml",
           "ms-swift": "ms_swift_pcb_qwen3vl_zero3.sh"}


def settings_and_deepspeed(name: str) -> tuple[dict, str]:
    text = (FRAMEWORKS / CONFIGS[name]).read_text()
    if name == "ms-swift":
        recipe = re.search(r"STABGUARD_RECIPE:-([^}]+)\}", text).group(1)
        return {"recipe": recipe}, "zero3"
    config = yaml.safe_load(text)
    return config["stabguard"], config["deepspeed"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_framework_config_names_its_command_and_its_settings_validate(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name their files from the repository's root, as their commands run
    path = FRAMEWORKS / CONFIGS[name]
    lines = path.read_text().splitlines()
    command = next(line for line in lines if line.startswith("#") and "recipes/frameworks/" in line)
    assert CONFIGS[name] in command, f"{path.name}: a comment near the top gives the command that runs it"
    assert f"stabguard data export data/pcb/train.jsonl --to {name}" in path.read_text()
    given, deepspeed = settings_and_deepspeed(name)
    settings = GuardSettings.model_validate(given)
    assert settings.guards and {"mask", "nonfinite", "spike", "grad_norm"} <= set(settings.guards), "every guard on"
    if deepspeed != "zero3":  # ms-swift names its own zero3 preset
        config = json.loads(Path(deepspeed).read_text())
        assert config["zero_optimization"]["stage"] == 3
        errors = [m for level, m in deepspeed_findings(config, {"bf16": True}) if level == "error"]
        assert not errors, errors


def test_the_zero2_deepspeed_config_passes_the_preflight():
    config = json.loads((FRAMEWORKS / "ds_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2 and not config["zero_optimization"]["overlap_comm"]
    assert not [m for level, m in deepspeed_findings(config, {"bf16": True}) if level == "error"]
