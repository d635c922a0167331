"""plugins/optim8bit.py: AdamW8bit over trainable parameters only, its fallback, its state size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support_runs import run_tiny
from transformers.training_args import OptimizerNames

from stabguard import EventLog, hookimpl
from stabguard.events import read_events
from stabguard.plugins import optim8bit
from stabguard.plugins.optim8bit import Optim8bitGuard, Options, state_bytes, state_bytes_per_param

ARGS = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                       optim=OptimizerNames.ADAMW_TORCH_FUSED)  # the Trainer's default, an enum


def lora_like(shapes=((16, 512), (512, 16), (16, 1024), (1024, 16)), seed=0):
    """LoRA-shaped parameters (each >= 4096 elements, so bitsandbytes quantizes their state) with gradients."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def groups(params, weight_decay=0.1):
    return [{"params": params[:-1], "weight_decay": weight_decay}, {"params": params[-1:], "weight_decay": 0.0},
            {"params": [], "weight_decay": 0.0}]


def test_adamw8bit_state_is_under_a_third_of_adamw():
    events = EventLog()
    eight = Optim8bitGuard(Options()).make_optimizer(args=ARGS, param_groups=groups(lora_like()), events=events)
    full = torch.optim.AdamW(lora_like(), lr=1e-3)
    for opt in (eight, full):
        opt.step()
    assert type(eight).__name__ == "AdamW8bit"
    assert state_bytes_per_param(full) == pytest.approx(8.0, rel=0.01)
    assert state_bytes(eight)[0] / state_bytes(full)[0] <= 0.3
    assert "AdamW8bit over" in events.of_kind("info")[0]["message"] and events.of_kind("alert") == []


def test_weight_decay_grouping_is_kept_and_empty_groups_dropped():
    params = lora_like()
    opt = Optim8bitGuard(Options()).make_optimizer(args=ARGS, param_groups=groups(params, 0.05), events=EventLog())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(params) - 1, 1]


def test_missing_bitsandbytes_falls_back_to_adamw_naming_the_reason(monkeypatch):
    def missing(paged):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(optim8bit, "adamw8bit_class", missing)
    events = EventLog()
    opt = Optim8bitGuard(Options()).make_optimizer(args=ARGS, param_groups=groups(lora_like()), events=events)
    assert type(opt) is torch.optim.AdamW
    assert "No module named 'bitsandbytes'" in events.of_kind("alert")[0]["message"]
    with pytest.raises(ImportError):
        Optim8bitGuard(Options(fallback=False)).make_optimizer(args=ARGS, param_groups=groups(lora_like()),
                                                               events=EventLog())


def test_an_optimizer_that_fails_on_the_device_is_caught_before_training(monkeypatch):
    class Broken:  # constructs fine, fails at its first step, as a bitsandbytes build without this device would
        def __init__(self, params, **kwargs):
            self.param_groups = [{"params": list(params)}]

        def step(self):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(optim8bit, "adamw8bit_class", lambda paged: Broken)
    events = EventLog()
    opt = Optim8bitGuard(Options()).make_optimizer(args=ARGS, param_groups=groups(lora_like()), events=events)
    assert type(opt) is torch.optim.AdamW and "no kernel for this device" in events.of_kind("alert")[0]["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what bitsandbytes does with paged state on CPU")
def test_paged_on_cpu_says_it_runs_unpaged():
    events = EventLog()
    opt = Optim8bitGuard(Options(paged=True)).make_optimizer(args=ARGS, param_groups=groups(lora_like()), events=events)
    assert type(opt).__name__ == "PagedAdamW8bit"
    assert "not supported on CPU" in events.of_kind("info")[0]["message"]


def test_a_non_default_training_optim_is_reported_as_replaced():
    events = EventLog()
    args = SimpleNamespace(**{**vars(ARGS), "optim": OptimizerNames.ADAFACTOR})
    Optim8bitGuard(Options()).make_optimizer(args=args, param_groups=groups(lora_like()), events=events)
    assert "training.optim = adafactor is replaced" in events.of_kind("alert")[0]["message"]


class Spy:
    def __init__(self):
        self.groups = None
        self.trainable = None

    @hookimpl
    def pre_step(self, state):
        if self.groups is None:
            self.groups = [(g["weight_decay"], {id(p) for p in g["params"]}) for g in state.optimizer.param_groups]
            self.trainable = {id(p) for p in state.model.parameters() if p.requires_grad}
            self.inner = type(state.optimizer.optimizer).__name__


def test_a_real_run_uses_adamw8bit_over_trainable_params_with_decay_groups(tmp_path, tiny_assets):
    spy = Spy()
    result = run_tiny(tmp_path, tiny_assets, spy, training={"max_steps": 2, "weight_decay": 0.1})
    assert result.ok and spy.inner == "AdamW8bit"
    assert spy.groups[0][0] == 0.1  # LoRA matrices decay; the empty no-decay group (no trainable bias/norm) is dropped
    assert set().union(*(ids for _, ids in spy.groups)) == spy.trainable
    events = [e for e in read_events(result.output_dir / "events.jsonl") if e["guard"] == "optim8bit"]
    sized = [e for e in events if "bytes per trainable parameter" in e["message"]]
    assert len(sized) == 1 and sized[0]["step"] == 1
    # The tiny model's LoRA tensors are all under 4096 elements: bitsandbytes keeps them in 32-bit state.
    assert sized[0]["values"]["state_bytes"] / sized[0]["values"]["trainable_params"] >= 8
    assert "all in tensors under 4096 elements, which bitsandbytes keeps in 32-bit state" in sized[0]["message"]
    assert sized[0]["values"]["console"] is True  # the reason is shown during the run, not only in the file
