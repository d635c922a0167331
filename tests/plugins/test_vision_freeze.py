"""plugins/vision_freeze.py on the real tiny Qwen3-VL: structural tower lookup, freezing, audits, the table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support_runs import run_tiny

from stabguard import EventLog, GuardError, hookimpl
from stabguard.events import read_events
from stabguard.models import load_model
from stabguard.plugins.vision_freeze import (
    Options, VisionFreezeGuard, find_layout, format_table, optimizer_leaks, parameter_table, trainable_under,
)
from stabguard.recipe import LoraSection, ModelSection, QuantizationSection

TEXT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(assets, targets=TEXT, lora=True):
    model = ModelSection(name_or_path=str(assets["model"]), dtype="float32")
    section = LoraSection(enabled=lora, r=4, alpha=8, target_modules=targets)
    net, _ = load_model(model, section, QuantizationSection())
    return net, SimpleNamespace(lora=section)


def note_freeze(model):
    """The source note's measure 3, verbatim: freeze by substring of the parameter name."""
    for name, param in model.named_parameters():
        if "vision" in name or "visual" in name:
            param.requires_grad = False


def trainable(model, *, lora=None, contains=""):
    return [n for n, p in model.named_parameters()
            if p.requires_grad and contains in n and (lora is None or (".lora_" in n) == lora)]


def test_all_linear_lora_in_the_tower_is_refused_naming_the_module(tiny_assets):
    model, recipe = load(tiny_assets, targets="all-linear")
    with pytest.raises(GuardError) as err:
        VisionFreezeGuard(Options()).setup_model(model=model, recipe=recipe, events=EventLog())
    message = str(err.value)
    assert 'target_modules = "all-linear" reaches into the vision tower' in message
    assert "base_model.model.model.visual.blocks.0.attn.qkv" in message and 'lora_in_vision = "freeze"' in message


def test_freeze_policy_freezes_tower_lora_and_keeps_text_lora(tiny_assets):
    model, recipe = load(tiny_assets, targets="all-linear")
    assert trainable(model, lora=True, contains="visual")  # PEFT did put adapters there
    events = EventLog()
    VisionFreezeGuard(Options(lora_in_vision="freeze")).setup_model(model=model, recipe=recipe, events=events)
    layout = find_layout(model)
    assert trainable_under(model, [layout.tower]) == []
    text_lora = trainable(model, lora=True, contains="language_model")
    assert text_lora and len(text_lora) == len(trainable(model))
    assert "Frozen" in events.of_kind("alert")[0]["message"]
    table = events.of_kind("info")[0]["values"]["table"]
    assert table["vision"]["trainable"] == table["projector"]["trainable"] == 0 and table["vision"]["lora"] > 0
    assert table["language model"]["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in text_lora)


def test_a_tower_peft_already_froze_is_said_to_be_frozen_not_froze_0(tiny_assets):
    model, recipe = load(tiny_assets)  # LoRA on the text model only: PEFT froze the tower itself
    events = EventLog()
    VisionFreezeGuard(Options()).setup_model(model=model, recipe=recipe, events=events)
    message = events.of_kind("info")[0]["message"]
    assert message.startswith("base_model.model.model.visual was already frozen") and "froze 0" not in message
    assert events.of_kind("info")[0]["values"]["frozen_params"] == 0


def test_train_projector_keeps_merger_lora_where_substring_freezing_over_freezes(tiny_assets):
    guarded, recipe = load(tiny_assets, targets="all-linear")
    guard = VisionFreezeGuard(Options(train_projector=True, lora_in_vision="freeze"))
    guard.setup_model(model=guarded, recipe=recipe, events=EventLog())
    kept = trainable(guarded, lora=True, contains="visual")
    assert kept and all(".merger." in n or ".deepstack_merger_list." in n for n in kept)
    assert not trainable(guarded, contains="visual.blocks.")
    by_note, _ = load(tiny_assets, targets="all-linear")
    note_freeze(by_note)
    assert trainable(by_note, contains="visual") == []  # the projector the user asked to train: frozen too


class RenamedTower(torch.nn.Module):
    """Qwen3-VL's parts under names without "vision"/"visual" in them (as other VLM families name them)."""

    def __init__(self, qwen):
        super().__init__()
        self.config = qwen.config
        self.encoder = qwen.model.visual
        self.decoder = qwen.model.language_model
        self.lm_head = qwen.lm_head

    def get_output_embeddings(self):
        return self.lm_head


def test_tower_is_found_by_its_config_when_not_named_vision(tiny_assets):
    by_note = RenamedTower(load(tiny_assets, lora=False)[0])
    note_freeze(by_note)
    missed = trainable(by_note, contains="encoder.")
    assert len(missed) == len(list(by_note.encoder.parameters()))  # the substring froze nothing of the tower
    model = RenamedTower(load(tiny_assets, lora=False)[0])
    assert find_layout(model).tower == "encoder"
    VisionFreezeGuard(Options()).setup_model(model=model, recipe=None, events=EventLog())
    assert trainable(model, contains="encoder.") == []
    assert trainable(model, contains="decoder.")  # full fine-tuning of the language model is untouched


def test_table_counts_every_parameter_once(tiny_assets):
    model, _ = load(tiny_assets)
    table = parameter_table(model)
    visual = model.base_model.model.model.visual
    assert table["all"]["total"] == sum(p.numel() for p in model.parameters())
    assert table["vision"]["total"] + table["projector"]["total"] == sum(p.numel() for p in visual.parameters())
    assert table["lm_head"]["total"] == model.base_model.model.lm_head.weight.numel()
    assert table["all"]["lora"] == table["all"]["trainable"] == table["language model"]["lora"] > 0
    assert format_table(table).splitlines()[0].split() == ["component", "total", "trainable", "LoRA"]


def test_no_tower_is_an_error_naming_the_class():
    with pytest.raises(GuardError, match="no vision tower found on Linear"):
        find_layout(torch.nn.Linear(2, 2))


def test_optimizer_audit_names_frozen_params(tiny_assets):
    model, recipe = load(tiny_assets)
    guard = VisionFreezeGuard(Options())
    guard.setup_model(model=model, recipe=recipe, events=EventLog())
    assert optimizer_leaks(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), guard.guarded) == []
    leaks = optimizer_leaks(torch.optim.AdamW(model.parameters()), guard.guarded)
    assert leaks and all(".visual." in n for n in leaks)


class NoteOptimizer:
    """make_optimizer as the source note wrote it: every parameter, frozen ones included."""

    @hookimpl(tryfirst=True)
    def make_optimizer(self, model, args):
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate)


def test_a_run_whose_optimizer_holds_the_tower_stops_before_the_first_update(tmp_path, tiny_assets):
    result = run_tiny(tmp_path, tiny_assets, NoteOptimizer(), training={"max_steps": 2})
    assert not result.ok
    assert "vision-tower parameters are in the optimizer" in result.stop_reason
    lora_b = [p for n, p in result.trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # still at PEFT's zero init: no update
    stops = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "stop"]
    assert stops[0]["guard"] == "vision_freeze" and stops[0]["step"] == 1
