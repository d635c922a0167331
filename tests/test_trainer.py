"""GuardTrainer on the real tiny Qwen3-VL: hook order, SKIP and STOP verdicts, the Trainer seams."""

import json
import pytest
import torch
from support import HookRecorder, tiny_recipe, write_recipe
from support_faults import GradFault, StopAt

from stabguard import Verdict, hookimpl
from stabguard.events import read_events
from stabguard.manager import Plugins
from stabguard.runner import run


def run_tiny(tmp_path, assets, *extra_plugins, training=None, guards=None):
    plugins = Plugins.for_recipe()
    for i, plugin in enumerate(extra_plugins):
        plugins.register(plugin, name=f"test-plugin-{i}")
    recipe = tiny_recipe(assets, tmp_path / "out", training=training, guards=guards)
    return run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins)


def test_hook_order_of_a_two_step_run(tmp_path, tiny_assets):
    recorder = HookRecorder()
    result = run_tiny(tmp_path, tiny_assets, recorder, training={"save_steps": 2})
    assert result.ok and result.global_step == 2
    # state_dict: the verified snapshot (every step by default) keeps the guards' state of its moment.
    step = ["post_backward", "pre_step", "state_dict", "on_step_end", "on_log"]
    # accelerate's data loader collates one batch ahead (it must know which batch is the last);
    # post_collate fires in the main process when the batch is about to reach the model.
    assert recorder.calls == [
        "configure", "setup_model", "make_optimizer",
        "pre_collate", "pre_collate", "post_collate", *step,
        "pre_collate", "post_collate", *step,
        "state_dict",  # the checkpoint at step 2
        "on_train_end",
    ]


class SkipAt:
    """Returns SKIP at step k and records what the step would have changed."""

    def __init__(self, k):
        self.k = k
        self.before = self.after = None
        self.lrs = {}

    def snapshot(self, state):
        params = {n: p.detach().clone() for n, p in state.model.named_parameters() if p.requires_grad}
        opt = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
               for p, s in state.optimizer.state.items()}
        return params, opt

    @hookimpl
    def pre_step(self, state):
        self.lrs[state.step] = state.optimizer.param_groups[0]["lr"]
        if state.step == self.k:
            self.before = self.snapshot(state)
            return Verdict.skip("test says skip", "skip-at")

    @hookimpl
    def on_step_end(self, state):
        if state.step == self.k:
            self.after = self.snapshot(state)


def test_skip_leaves_parameters_optimizer_and_lr_unchanged(tmp_path, tiny_assets):
    skip = SkipAt(k=2)
    result = run_tiny(tmp_path, tiny_assets, skip, training={"max_steps": 4, "warmup_steps": 3},
                      guards={"optim8bit": {"enabled": False}})
    assert result.ok and result.global_step == 4 and result.skipped_steps == 1
    (p0, o0), (p1, o1) = skip.before, skip.after
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    assert o0.keys() == o1.keys() and all(torch.equal(o0[k][t], o1[k][t]) for k in o0 for t in o0[k])
    assert skip.lrs[3] == skip.lrs[2], "the scheduler must not advance on a skipped step"
    assert skip.lrs[4] > skip.lrs[3], "warm-up continues after the skip"
    events = read_events(result.output_dir / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "skip"] == [2]
    logged = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert max(entry.get("stabguard/skipped_steps", 0) for entry in logged) == 1


def test_stop_saves_last_good_state_and_ends(tmp_path, tiny_assets):
    result = run_tiny(tmp_path, tiny_assets, StopAt(k=3), training={"max_steps": 5})
    assert not result.ok and "test says stop" in result.stop_reason
    checkpoint = result.output_dir / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "stabguard_state.json").exists()
    assert not (result.output_dir / "checkpoint-3").exists()
    stops = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["values"]["checkpoint"].endswith("checkpoint-2")


def test_nan_gradient_is_skipped_and_weights_stay_finite(tmp_path, tiny_assets):
    result = run_tiny(tmp_path, tiny_assets, GradFault(at={2}, value=float("nan"), param="lora_A"), training={"max_steps": 3})
    assert result.ok and result.skipped_steps == 1
    model = result.trainer.model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skips = [e for e in read_events(result.output_dir / "events.jsonl") if e["kind"] == "skip"]
    assert skips[0]["guard"] == "nonfinite" and "gradients" in skips[0]["message"]


def test_one_norm_pass_per_optimizer_step(tmp_path, tiny_assets, monkeypatch):
    import stabguard.engine

    calls = []
    real = stabguard.engine.grad_norms
    monkeypatch.setattr(stabguard.engine, "grad_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: pytest.fail("a second norm pass"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("a second norm pass"))
    result = run_tiny(tmp_path, tiny_assets, training={"max_steps": 3, "gradient_accumulation_steps": 2})
    assert result.ok and len(calls) == 3


class AlwaysSkip:
    """A third-party guard that skips every step (a bug in the guard, or data that is always bad)."""

    @hookimpl
    def pre_step(self, state):
        return Verdict.skip("always", "always-skip")


def test_the_core_stops_a_run_that_only_skips(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe()
    plugins.register(AlwaysSkip(), name="always-skip")
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 10}, max_consecutive_skips=3)
    result = run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins)
    assert not result.ok and "3 steps skipped in a row" in result.stop_reason
    assert result.skipped_steps == 2 and (result.output_dir / "checkpoint-2").exists()
    logged = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert not any("loss" in entry for entry in logged if "grad_norm" in entry), "no step trained, no loss logged"


def test_stop_with_epoch_strategies_writes_no_checkpoint_after_the_stop(tmp_path, tiny_assets):
    plugins = Plugins.for_recipe()
    plugins.register(StopAt(k=3), name="stop-at")
    recipe = tiny_recipe(tiny_assets, tmp_path / "out",
                         training={"max_steps": 5, "save_strategy": "epoch", "eval_strategy": "epoch"})
    recipe["data"]["val"] = str(tiny_assets["val"])
    result = run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins)
    assert not result.ok
    assert sorted(p.name for p in result.output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
