"""The gradient-guard tests' runs: faults and probes come from ``stabguard.testing`` (public, one copy).

Used by tests/plugins/test_{nonfinite,grad_norm,spike}.py, tests/test_probe.py and tests/engine_worker.py.
"""

from __future__ import annotations

import torch

from stabguard import hookimpl
from stabguard.runner import run
from stabguard.testing import (  # noqa: F401 - re-exported for the tests
    GradFault, LossFault, PoisonBatch, StepProbe, StopAt, same_state, tiny_recipe, trainable_state, write_recipe,
)
from stabguard.testing import guard_plugins as _guard_plugins
from stabguard.testing.probes import on_rank  # noqa: F401

GUARDS = ("nonfinite", "grad_norm", "spike")


def guard_plugins(*test_plugins, guards=GUARDS):
    """A fresh manager holding only the given built-in guards and the test plugins."""
    return _guard_plugins(*test_plugins, guards=tuple(guards), prefix="fault")


def run_guarded(tmp_path, assets, *test_plugins, training=None, guards=None, resume=None, enabled=GUARDS, heal=False,
                **top):
    """One tiny run with the gradient guards; returns (RunResult, Plugins). ``top``: recipe top-level keys."""
    plugins = guard_plugins(*test_plugins, guards=enabled)
    recipe = tiny_recipe(assets, tmp_path / "out", training=training, guards=guards, **top)
    return run(write_recipe(tmp_path / "recipe.toml", recipe), plugins=plugins, resume=resume,
               heal=heal), plugins


# -- faults the probe finds (``stabguard check --probe``), made inside the model, not by a recipe setting --

def submodule(model, suffix: str):
    return next(m for n, m in model.named_modules() if n.endswith(suffix))


def inner_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CutPath:
    """The gradient path cut inside the model: layer 0's output detached."""

    @hookimpl
    def setup_model(self, model):
        layer = submodule(model, "language_model.layers.0")
        layer.register_forward_hook(lambda m, args, out: out.detach() if torch.is_tensor(out) else
                                    tuple(o.detach() if torch.is_tensor(o) else o for o in out))


class Amplify:
    """One module's activations pushed past fp16's range (on one rank only, with ``rank``)."""

    def __init__(self, suffix: str, rank: int | None = None):
        self.suffix, self.rank = suffix, rank

    @hookimpl
    def setup_model(self, model):
        if on_rank(self.rank):
            submodule(model, self.suffix).register_forward_hook(lambda m, args, out: out * 1e9)


class DropsNumItems:
    """A model that says it takes the loss kwargs, whose forward ignores num_items_in_batch: it returns each
    batch's mean, which the Trainer does not divide (transformers#37766)."""

    @hookimpl
    def setup_model(self, model):
        inner = inner_model(model)
        inner.accepts_loss_kwargs = True  # Qwen3-VL says False: the Trainer would divide by the accumulation
        forward = inner.forward
        inner.forward = lambda *args, num_items_in_batch=None, **kwargs: forward(*args, **kwargs)


class Drift:
    """A divergence that lives in the weights: every row's logits pushed by ``c`` times the adapters' mean
    |lora_B| (0 at LoRA's start), in training and in a replay alike; only an earlier state undoes it."""

    def __init__(self, c: float = 2000.0):
        self.c, self.params = c, []

    @hookimpl
    def setup_model(self, model):
        self.params = [p for n, p in model.named_parameters() if "lora_B" in n]
        model.register_forward_hook(self.push, with_kwargs=True)

    def push(self, module, args, kwargs, output):
        from stabguard.faults import _causal_loss

        size = torch.stack([p.detach().abs().mean() for p in self.params]).mean()
        push = torch.zeros_like(output.logits)
        push[..., -1] = self.c * size
        output.logits = output.logits + push
        if kwargs.get("labels") is not None:
            output.loss = _causal_loss(output.logits, kwargs["labels"])
        return output
