"""Fault injection: make a run fail on purpose, to see the guards act (and to test your own guards).

Not a guard and not loaded by default: name it in a recipe, ``plugins = ["stabguard.faults"]``, and say
what to break in ``[guards.faults]``. Every fault happens where a real one would, before any guard
looks: a NaN or a huge value in one LoRA gradient during the backward pass of the chosen optimizer steps,
or a finite damaging update (noise added to every trainable weight right after the chosen steps' update:
nothing is non-finite, only the next losses show it). ``recipes/pcb_tiny_faults.toml`` uses it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stabguard import GuardOptions, hookimpl

NAME = "faults"


class Options(GuardOptions):
    nan_grad_at: list[int] = Field(default_factory=list, description="optimizer steps whose gradient gets a NaN")
    grad_scale_at: list[int] = Field(default_factory=list, description="optimizer steps whose gradient is scaled")
    grad_scale: float = Field(default=1e4, gt=0, description="the factor for grad_scale_at")
    damage_at: list[int] = Field(default_factory=list, description="optimizer steps whose update is followed "
                                 "by noise on every trainable weight")
    damage_std: float = Field(default=0.5, gt=0, description="the noise's standard deviation for damage_at")


class FaultInjector:
    def __init__(self, options: Options):
        self.options = options
        self.step = 1  # the optimizer step the next backward pass belongs to

    @hookimpl
    def setup_model(self, model, events):
        # lora_B: lora_A's gradient is zero until lora_B has moved away from its zero init.
        name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad)
        param.register_hook(self._corrupt)
        events.record(NAME, "info", f"fault injection armed on {name}: NaN at steps {self.options.nan_grad_at}, "
                      f"x{self.options.grad_scale:g} at steps {self.options.grad_scale_at}")

    def _corrupt(self, grad: torch.Tensor) -> torch.Tensor:
        if self.step in self.options.grad_scale_at:
            grad = grad * self.options.grad_scale
        if self.step in self.options.nan_grad_at:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    @hookimpl
    def on_step_end(self, state, events):
        self.step = state.step + 1
        if state.step in self.options.damage_at:
            self._damage(state.model, state.step, events)

    @torch.no_grad()
    def _damage(self, model, step: int, events) -> None:
        generator = torch.Generator().manual_seed(step)
        for param in (p for p in model.parameters() if p.requires_grad):
            noise = torch.randn(param.shape, generator=generator) * self.options.damage_std
            param.add_(noise.to(param.device, param.dtype))
        events.record(NAME, "info", f"fault: noise (std {self.options.damage_std:g}) added to every trainable "
                      f"weight after step {step}'s update", step=step)


@hookimpl
def register_guards(register):
    register(NAME, Options, FaultInjector)
