"""stabguard/faults.py: the shipped fault injector makes real faults, and the guards act on them."""

import json

import torch

from support import tiny_recipe, write_recipe

from stabguard.events import read_events
from stabguard.manager import Plugins
from stabguard.runner import run


def test_injected_faults_are_skipped_and_alerted(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe(["stabguard.faults"])
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 5}, plugins=["stabguard.faults"],
                         guards={"faults": {"nan_grad_at": [2], "grad_scale_at": [4], "grad_scale": 1e5}})
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=plugins)
    assert result.ok and result.skipped_steps == 1
    events = read_events(result.output_dir / "events.jsonl")
    assert [(e["step"], e["guard"]) for e in events if e["kind"] == "skip"] == [(2, "nonfinite")]
    alerts = [e for e in events if e["kind"] == "alert" and e["guard"] == "grad_norm"]
    assert [a["step"] for a in alerts] == [4] and alerts[0]["values"]["grad_norm"] > 10
    logged = {e["step"]: e for e in json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]}
    assert logged[4]["stabguard/grad_norm_post_clip"] == 1.0, "the spiked step is clipped to max_grad_norm"


def test_without_faults_configured_nothing_breaks(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe(["stabguard.faults"])
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", plugins=["stabguard.faults"])
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=plugins)
    assert result.ok and result.skipped_steps == 0


def test_an_inf_loss_with_finite_gradients_is_skipped_and_a_fault_for_another_rank_does_nothing(tmp_path, tiny_assets):
    """inf_loss_at changes the loss's value only (a rank whose loss alone overflowed): the nonfinite guard's
    check of the loss must see it. ``ranks`` limits the faults: rank 1's fault does not fire on rank 0."""
    guards = {"faults": {"inf_loss_at": [2], "nan_loss_at": [4], "ranks": [0]}}
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 5}, plugins=["stabguard.faults"],
                         guards=guards)
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=Plugins.for_recipe(["stabguard.faults"]))
    events = read_events(result.output_dir / "events.jsonl")
    skips = {e["step"]: e["message"] for e in events if e["kind"] == "skip"}
    assert sorted(skips) == [2, 4], f"the Inf loss and the NaN loss are skipped: {skips}"
    assert "non-finite loss (loss=inf" in skips[2] and "non-finite loss (loss=nan" in skips[4], skips

    guards["faults"]["ranks"] = [1]
    recipe = tiny_recipe(tiny_assets, tmp_path / "other", training={"max_steps": 5}, plugins=["stabguard.faults"],
                         guards=guards)
    result = run(write_recipe(tmp_path / "r.toml", recipe), plugins=Plugins.for_recipe(["stabguard.faults"]))
    assert result.ok and result.skipped_steps == 0, "faults for rank 1 do not act on rank 0"


class TwoLoras(torch.nn.Module):
    """The names of a LoRA pair as peft gives them, with nothing else."""

    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})

    def forward(self, x):
        return self.lora_B["default"](self.lora_A["default"](x)).sum()


class Events:
    def record(self, *args, **kwargs):
        pass


def test_a_nan_gradient_reaches_a_parameter_the_engine_replaced():
    """FSDP2's fully_shard replaces the parameters after the guards' setup, so a hook on the one set up never
    fires: the NaN enters through the LoRA B output instead (both of its pair's gradients turn NaN). Where the
    parameter stays, its own gradient alone gets the NaN."""
    from stabguard.faults import FaultInjector, Options

    for replaced in (False, True):
        model = TwoLoras()
        FaultInjector(Options(nan_grad_at=[1])).setup_model(model, Events())
        if replaced:  # what fully_shard does to every parameter
            model.lora_B["default"].weight = torch.nn.Parameter(model.lora_B["default"].weight.detach().clone())
        model(torch.ones(1, 4)).backward()
        b, a = model.lora_B["default"].weight.grad, model.lora_A["default"].weight.grad
        assert torch.isnan(b).any(), f"replaced={replaced}: lora_B's gradient {b}"
        assert torch.isnan(a).any() == replaced, f"replaced={replaced}: lora_A's gradient {a}"
