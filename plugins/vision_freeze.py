"""vision_freeze: freeze the vision tower (and projector) after PEFT wrapping, then prove it stayed frozen.

The usual recipe (the fix in recipes/pcb_qwen3vl.toml among them) froze by substring ("vision" or
"visual" in a parameter name). That misses a tower named otherwise (``encoder``, ``image_tower``),
misses a projector beside the tower (``multi_modal_projector``) and freezes anything that happens to
contain the word. Here the tower is the module built from the model's own ``config.vision_config``;
names are only a fallback. The audit then checks no trainable parameter or LoRA adapter is left under
it, and, before the first update, that none of its parameters reached the optimizer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from stabguard import GuardError, GuardOptions, Verdict, hookimpl
from stabguard.where import module_of

NAME = "vision_freeze"
TOWER_ATTRIBUTES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_tower")
PROJECTOR_ATTRIBUTES = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector")
COMPONENTS = ("vision", "projector", "language model", "lm_head")


class Options(GuardOptions):
    train_projector: bool = Field(default=False, description=(
        "leave the projector/mergers as PEFT set them (LoRA on them allowed); false freezes them too"))
    lora_in_vision: Literal["error", "freeze"] = Field(
        default="error", description="LoRA adapters found under the vision tower: refuse, or freeze them")


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class Layout:
    """Qualified module names of the model's parts, as ``named_parameters`` spells them."""

    tower: str
    projector: list[str] = field(default_factory=list)
    lm_head: list[str] = field(default_factory=list)

    def component(self, param_name: str) -> str:
        if under(param_name, self.projector):
            return "projector"
        if under(param_name, [self.tower]):
            return "vision"
        return "lm_head" if under(param_name, self.lm_head) else "language model"

    def frozen_prefixes(self, train_projector: bool) -> tuple[list[str], list[str]]:
        """(prefixes to freeze, prefixes exempt inside them)."""
        if train_projector:
            return [self.tower], list(self.projector)
        return [self.tower, *self.projector], []


def _qualified(model: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None) if target is not None else None


def _tower_by_config(model: torch.nn.Module) -> str | None:
    """The shallowest submodule built from ``config.vision_config`` (the same object, else the same class)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision_config = getattr(getattr(base, "config", None), "vision_config", None)
    if vision_config is None:
        return None
    found = [(name, getattr(m, "config", None) is vision_config) for name, m in model.named_modules()
             if name and isinstance(getattr(m, "config", None), type(vision_config))]
    found.sort(key=lambda item: (not item[1], item[0].count(".")))
    return found[0][0] if found else None


def _tower_by_name(model: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        for attr in TOWER_ATTRIBUTES:
            if isinstance(module._modules.get(attr), torch.nn.Module):
                return f"{name}.{attr}" if name else attr
    return None


def find_layout(model: torch.nn.Module) -> Layout:
    """Where the vision tower, projector and lm_head are; GuardError when the model has no tower."""
    tower = _tower_by_config(model) or _tower_by_name(model)
    if tower is None:
        raise GuardError(f"{NAME}: no vision tower found on {type(model).__name__} (no submodule built from "
                         f"config.vision_config, none named {', '.join(TOWER_ATTRIBUTES)})")
    parent = tower.rpartition(".")[0]
    modules = dict(model.named_modules())
    projector = [f"{owner}.{attr}".lstrip(".") for owner in (tower, parent) for attr in PROJECTOR_ATTRIBUTES
                 if f"{owner}.{attr}".lstrip(".") in modules]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = [name for name in [_qualified(model, head)] if name]
    return Layout(tower, projector, lm_head)


def is_lora(param_name: str) -> bool:
    return ".lora_" in param_name


def parameter_table(model: torch.nn.Module, layout: Layout | None = None) -> dict[str, dict[str, int]]:
    """Parameters per component: total, trainable, LoRA (tied weights counted once)."""
    layout = layout or find_layout(model)
    table = {c: {"total": 0, "trainable": 0, "lora": 0} for c in (*COMPONENTS, "all")}
    for name, param in model.named_parameters():
        n = param_count(param)
        for row in (table[layout.component(name)], table["all"]):
            row["total"] += n
            row["trainable"] += n if param.requires_grad else 0
            row["lora"] += n if is_lora(name) else 0
    return table


def param_count(param: torch.Tensor) -> int:
    """Logical parameter count; a 4-bit bitsandbytes tensor stores two values per byte."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def format_table(table: dict[str, dict[str, int]]) -> str:
    lines = [f"{'component':<16}{'total':>16}{'trainable':>16}{'LoRA':>14}"]
    for component, row in table.items():
        lines.append(f"{component:<16}{row['total']:>16,}{row['trainable']:>16,}{row['lora']:>14,}")
    return "\n".join(lines)


def lora_modules(model: torch.nn.Module, prefixes: list[str], exempt: list[str] = ()) -> list[str]:
    """Modules under ``prefixes`` (outside ``exempt``) that carry a LoRA adapter."""
    names = [n.split(".lora_")[0] for n, _ in model.named_parameters()
             if is_lora(n) and under(n, prefixes) and not under(n, exempt)]
    return list(dict.fromkeys(names))


def trainable_under(model: torch.nn.Module, prefixes: list[str], exempt: list[str] = ()) -> list[str]:
    """The audit: names of trainable parameters under ``prefixes``, outside ``exempt``."""
    return [n for n, p in model.named_parameters() if p.requires_grad and under(n, prefixes) and not under(n, exempt)]


def guarded_params(model: torch.nn.Module, layout: Layout, train_projector: bool) -> dict[int, str]:
    """id -> name of every parameter that must stay frozen: the tower, and the projector unless trained."""
    prefixes, exempt = layout.frozen_prefixes(train_projector)
    return {id(p): n for n, p in model.named_parameters() if under(n, prefixes) and not under(n, exempt)}


def optimizer_leaks(optimizer, guarded: dict[int, str]) -> list[str]:
    """Names of guarded parameters found in the optimizer's parameter groups."""
    return [guarded[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in guarded]


def lora_message(modules: list[str], tower: str, target_modules) -> str:
    reach = ('lora.target_modules = "all-linear" reaches into the vision tower' if target_modules == "all-linear"
             else f"lora.target_modules = {target_modules!r} matches modules of the vision tower")
    return f"{NAME}: {reach}: LoRA adapters on {len(modules)} modules under {tower} (e.g. {modules[0]})."


TEXT_TARGETS = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
LORA_FIX = (f" Name the text projections instead ({TEXT_TARGETS}), or set [guards.vision_freeze] "
            'lora_in_vision = "freeze" to freeze those adapters.')
LORA_FROZEN = (' Frozen, as lora_in_vision = "freeze" asks; they still cost memory and compute: name the text '
               f"projections instead ({TEXT_TARGETS}).")


def freeze(model: torch.nn.Module, guarded: dict[int, str]) -> int:
    """Set ``requires_grad=False`` on the guarded parameters; return how many were trainable."""
    frozen = 0
    for param in model.parameters():
        if id(param) in guarded:
            frozen += param_count(param) if param.requires_grad else 0
            param.requires_grad_(False)
    return frozen


class VisionFreezeGuard:
    def __init__(self, options: Options):
        self.options = options
        self.guarded: dict[int, str] = {}
        self.optimizer_checked = False

    @hookimpl
    def setup_model(self, model, recipe, events):
        layout = find_layout(model)
        frozen_region, exempt = layout.frozen_prefixes(self.options.train_projector)
        adapters = lora_modules(model, frozen_region, exempt)
        if adapters:
            message = lora_message(adapters, layout.tower, getattr(getattr(recipe, "lora", None), "target_modules", None))
            if self.options.lora_in_vision == "error":
                raise GuardError(message + LORA_FIX)
            events.alert(NAME, message + LORA_FROZEN, modules=adapters)
        self.guarded = guarded_params(model, layout, self.options.train_projector)
        frozen = freeze(model, self.guarded)
        left = trainable_under(model, frozen_region, exempt)
        if left:
            raise GuardError(f"{NAME}: still trainable under {layout.tower} after freezing: {left[:3]}")
        self._report(model, layout, frozen, len(adapters), events)

    def _report(self, model, layout: Layout, frozen: int, adapters: int, events) -> None:
        table = parameter_table(model, layout)
        kept = f"; projector kept as PEFT set it: {', '.join(layout.projector)}" if self.options.train_projector else ""
        done = (f"froze {frozen:,} parameters under {layout.tower}" if frozen else
                f"{layout.tower} was already frozen (PEFT freezes every weight but the adapters); kept frozen")
        events.record(NAME, "info", done + kept, tower=layout.tower,
                      projector=layout.projector, frozen_params=frozen, lora_modules_frozen=adapters, table=table)
        if self.options.train_projector and layout.projector and table["projector"]["trainable"] == 0:
            events.alert(NAME, "train_projector = true, but nothing in the projector is trainable: LoRA "
                         "target_modules do not reach it (add linear_fc1/linear_fc2) and PEFT froze its weights")
        print(f"stabguard: parameters per component\n{format_table(table)}", file=sys.stderr, flush=True)

    @hookimpl
    def preflight(self, model, optimizer, report):
        """``stabguard check``: the parameter table per component, and no vision parameter in the optimizer."""
        layout = find_layout(model)
        table = parameter_table(model, layout)
        row = table["all"]
        report("info", f"{row['trainable']:,} of {row['total']:,} parameters trainable ({row['lora']:,} LoRA)",
               check="parameters", details=format_table(table).splitlines(), table=table, tower=layout.tower)
        if optimizer is None:
            return
        leaks = optimizer_leaks(optimizer, guarded_params(model, layout, self.options.train_projector))
        if leaks:
            report("error", f"{type(optimizer).__name__} holds {len(leaks)} vision-tower parameters "
                   f"(e.g. {leaks[0]}): pass only trainable parameters", check="optimizer", details=leaks[:5],
                   leaks=len(leaks))
        else:
            report("ok", f"{type(optimizer).__name__}: no vision-tower parameter in its groups", check="optimizer")

    @hookimpl
    def probe(self, model, report):
        """``stabguard check --probe``: after a real backward, no gradient anywhere in the frozen region
        (a later ``setup_model`` or a user's script can make it trainable again)."""
        layout = find_layout(model)
        frozen_region, exempt = layout.frozen_prefixes(self.options.train_projector)
        leaks = [n for n, p in model.named_parameters()
                 if under(n, frozen_region) and not under(n, exempt) and p.grad is not None and bool(p.grad.any())]
        if leaks:
            report("error", f"gradients reached {len(leaks)} parameters of the frozen {layout.tower} (e.g. "
                   f"{leaks[0]}): something made them trainable after this guard froze them", check="probe: gradients",
                   details=leaks[:5], leaks=len(leaks))
        else:
            region = ", ".join(module_of(prefix + ".weight")[0] for prefix in frozen_region)
            report("ok", f"no gradient reached the frozen {region}", check="probe: gradients")

    @hookimpl
    def pre_step(self, state):
        """Before the first update: no parameter of the frozen region may sit in the optimizer."""
        if self.optimizer_checked or state.optimizer is None:
            return None
        self.optimizer_checked = True
        leaks = optimizer_leaks(state.optimizer, self.guarded)
        if leaks:
            return Verdict.stop(f"{len(leaks)} vision-tower parameters are in the optimizer (e.g. {leaks[0]}); "
                                "a make_optimizer passing model.parameters() includes frozen weights: pass only "
                                "trainable ones", NAME)
        return None


@hookimpl
def register_guards(register):
    register(NAME, Options, VisionFreezeGuard)
