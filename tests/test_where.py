"""stabguard/where.py: per-tensor gradient norms grouped by module, and the first non-finite output."""

from __future__ import annotations

import math

import pytest
import torch

from stabguard.where import first_nonfinite_output, group, layer_of, module_of


@pytest.mark.parametrize("name, module, part", [
    ("base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.default.weight",
     "language_model.layers.3.mlp.down_proj", "lora_B"),
    ("base_model.model.lm_head.weight", "lm_head", "weight"),
    ("model.visual.merger.linear_fc1.bias", "visual.merger.linear_fc1", "bias"),
    ("_fsdp_wrapped_module.base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
     "language_model.layers.0.self_attn.q_proj", "lora_A"),
])
def test_a_parameter_is_named_by_its_module_and_part(name, module, part):
    assert module_of(name) == (module, part)


def test_layers_are_numbered_blocks_or_the_module_itself():
    assert layer_of("language_model.layers.3.mlp.down_proj") == "language_model.layers.3"
    assert layer_of("visual.blocks.0.attn.qkv") == "visual.blocks.0"
    assert layer_of("visual.merger.linear_fc1") == "visual.merger" and layer_of("lm_head") == "lm_head"


def test_shares_of_the_squared_norm_by_module_and_the_non_finite_tensors_counted():
    names = ["m.layers.0.q.lora_A.default.weight", "m.layers.0.q.lora_B.default.weight",
             "m.layers.1.q.lora_B.default.weight", "m.layers.1.v.lora_B.default.weight"]
    where = group(names, [3.0, 4.0, 0.0, math.nan])
    assert where.modules[0] == ("m.layers.0.q", "lora_B", pytest.approx(16 / 25))
    assert sum(s for _, _, s in where.modules) == pytest.approx(1.0)
    assert where.nonfinite == {"m.layers.1.v": 1} and where.layers["m.layers.0"] == pytest.approx(1.0)
    assert where.brief().startswith("NaN/Inf gradients in m.layers.1.v (1)")
    assert group(names[:2], [3.0, 4.0]).brief() == "m.layers.0.q (lora_B) 64%, m.layers.0.q (lora_A) 36%"


def test_the_first_module_whose_output_is_not_finite_is_named_in_execution_order():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lm_head(torch.relu(self.body(x)))

    net = Net()
    assert first_nonfinite_output(net, {"x": torch.ones(2, 4)}) is None
    with torch.no_grad():
        net.lm_head.weight[0, 0] = math.inf
    assert first_nonfinite_output(net, {"x": torch.ones(2, 4)}) == "lm_head", "inner modules before their parents"
    assert not net._forward_hooks and not net.lm_head._forward_hooks, "the hooks are gone after the replay"


# ---- real runs on the tiny Qwen3-VL: the fault's own module is named ---------------------------------

from support_faults import GradFault, run_guarded  # noqa: E402

from stabguard import hookimpl  # noqa: E402
from stabguard.events import read_events  # noqa: E402

ADAPTER = "language_model.layers.1.mlp.down_proj"


def test_a_gradient_scaled_by_1e4_on_one_adapter_names_that_adapter_first(tmp_path, tiny_assets):
    fault = GradFault([3], scale=1e4, param=f"{ADAPTER}.lora_B")
    result, _ = run_guarded(tmp_path, tiny_assets, fault, training={"max_steps": 4},
                            guards={"grad_norm": {"alert_above": 5.0}})
    (alert,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "alert"]
    module, part, share = alert["values"]["where"]["modules"][0]
    assert (alert["step"], module, part) == (3, ADAPTER, "lora_B") and share > 0.99
    assert f"; where: {ADAPTER} (lora_B) 100%" in alert["message"], "the alert line says where"


def test_a_nan_in_one_gradient_names_its_tensors(tmp_path, tiny_assets):
    fault = GradFault([2], value=float("nan"), param=f"{ADAPTER}.lora_B")
    result, _ = run_guarded(tmp_path, tiny_assets, fault, training={"max_steps": 3})
    (skip,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "skip"]
    assert skip["values"]["where"]["nonfinite"] == {ADAPTER: 1}, "the one tensor, not its neighbours"
    assert f"[where: NaN/Inf gradients in {ADAPTER} (1)]" in skip["message"]


class InfLogits:
    """lm_head's output is Inf in every forward of step 2 (a replay of that step's batch too)."""

    def __init__(self):
        self.step = 1

    @hookimpl
    def setup_model(self, model):
        head = next(m for n, m in model.named_modules() if n.endswith("lm_head"))
        head.register_forward_hook(lambda module, args, out: out * float("inf") if self.step == 2 else None)

    @hookimpl
    def on_step_end(self, state):
        self.step = state.step + 1


def test_inf_logits_name_lm_head_as_the_first_non_finite_output(tmp_path, tiny_assets):
    result, _ = run_guarded(tmp_path, tiny_assets, InfLogits(), training={"max_steps": 3})
    (skip,) = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "skip"]
    assert skip["step"] == 2 and skip["values"]["where"]["first_nonfinite_output"] == "lm_head"
    assert "first non-finite output: lm_head" in skip["message"]
    assert result.ok and result.trainer.guarded.micro == [], "the step's inputs are let go once it decided"
