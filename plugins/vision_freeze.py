"""vision_freeze: freeze the vision tower (and projector) after PEFT wrapping, then audit it.

The source note froze by substring ("vision" in the parameter name). Here the tower is found from the
model's structure: the module the model exposes for its vision config (``.visual`` on Qwen-VL). The
audit then proves no trainable parameter and no LoRA adapter is left under it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stabguard import GuardError, GuardOptions, hookimpl

NAME = "vision_freeze"
TOWER_ATTRIBUTES = ("visual", "vision_tower", "vision_model")
PROJECTOR_ATTRIBUTES = ("merger", "deepstack_merger_list", "multi_modal_projector")


class Options(GuardOptions):
    train_projector: bool = Field(default=False, description="keep the projector/mergers trainable")
    lora_in_vision: Literal["error", "freeze"] = Field(
        default="error", description="LoRA adapters found under the vision tower: refuse, or freeze them")


def find_vision_tower(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The vision tower's qualified name and module, found through the model's own attributes."""
    for name, module in model.named_modules():
        for attr in TOWER_ATTRIBUTES:
            tower = getattr(module, attr, None)
            if isinstance(tower, torch.nn.Module):
                return (f"{name}.{attr}" if name else attr), tower
    raise GuardError(f"{NAME}: no vision tower found on {type(model).__name__} "
                     f"(looked for a submodule named {', '.join(TOWER_ATTRIBUTES)})")


def projector_prefixes(tower_name: str, tower: torch.nn.Module) -> list[str]:
    return [f"{tower_name}.{attr}" for attr in PROJECTOR_ATTRIBUTES if hasattr(tower, attr)]


class VisionFreezeGuard:
    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def setup_model(self, model, events):
        tower_name, tower = find_vision_tower(model)
        projector = projector_prefixes(tower_name, tower) if self.options.train_projector else []
        lora = [n for n, _ in model.named_parameters() if n.startswith(tower_name + ".") and "lora_" in n]
        if lora and self.options.lora_in_vision == "error":
            raise GuardError(
                f"{NAME}: {len(lora)} LoRA parameters under the vision tower {tower_name} (e.g. {lora[0]}); "
                "target_modules reaches into it (\"all-linear\" does). Name the text projections instead, "
                "or set [guards.vision_freeze] lora_in_vision = \"freeze\".")
        frozen = 0
        for name, param in model.named_parameters(prefix=""):
            if name.startswith(tower_name + ".") and not any(name.startswith(p + ".") for p in projector):
                frozen += param.numel() if param.requires_grad else 0
                param.requires_grad_(False)
        left = audit(model, tower_name, projector)
        if left:
            raise GuardError(f"{NAME}: still trainable under {tower_name} after freezing: {left[:3]}")
        events.record(NAME, "info", f"froze {frozen:,} parameters under {tower_name}"
                      + (f" (projector kept trainable: {', '.join(projector)})" if projector else ""),
                      tower=tower_name, frozen_params=frozen, lora_frozen=len(lora))


def audit(model: torch.nn.Module, tower_name: str, allowed: list[str] = ()) -> list[str]:
    """Names of trainable parameters under the vision tower outside the ``allowed`` prefixes."""
    return [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(tower_name + ".")
            and not any(n.startswith(a + ".") for a in allowed)]


@hookimpl
def register_guards(register):
    register(NAME, Options, VisionFreezeGuard)
