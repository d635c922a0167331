"""Where a step broke: which modules its gradient norm came from, which tensors hold NaN/Inf, and which
module first produced a non-finite output.

The step's one norm pass already computes a norm per gradient tensor; the engine keeps them on the device
(no host sync). On a step that is anomalous anyway (not PROCEED, or a guard asked with
``state.ask_where()``; known after the step's one agreement) the core brings them to the host — under
FSDP2 and ZeRO after one extra collective, so every rank gets the global shares — and this module groups
them by module: ``language_model.layers.3.mlp.down_proj (lora_B): 97%``.

For a non-finite loss the core also replays the micro-batch that gave it, with forward hooks on every
module, to name the first module whose output was non-finite (hooks left on all the time cost every
step; armed for the next occurrence, they would miss a one-off). The replay runs the unwrapped model
in eval mode (no dropout; hooks on training forwards stay out) without gradients, on the ranks whose
loss was non-finite; under FSDP2 and ZeRO-3 a forward needs every rank's weights, so it is not
replayed there (the gradient shares still are computed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_SUFFIX = re.compile(r"\.(weight|bias)$")
_ADAPTER = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.[^.]+)?$")
_WRAPPERS = ("base_model.model.", "_fsdp_wrapped_module.", "module.", "model.")


@dataclass
class Where:
    """Where a step's gradient norm came from. Shares are of the squared global norm (they add up to 1).

    :ivar modules: ``[(module, part, share)]``, largest share first: ``part`` is the adapter matrix
        (``lora_A``, ``lora_B``) or ``weight``/``bias``.
    :ivar nonfinite: ``{module: number of its gradient tensors holding NaN/Inf}``.
    :ivar first_nonfinite_output: the first module whose forward output was non-finite when the step's
        non-finite micro-batch was replayed, or None (not replayed, or every output finite).
    :ivar layers: ``{layer: share}`` (``language_model.layers.3``, ``visual.blocks.0``, ``lm_head``, ...).
    :ivar tensors: ``{parameter name: global gradient norm}`` for every parameter with a gradient (as the
        engine names them; not kept in the event log). A trainable parameter missing here got none (under
        ZeRO, which keeps a zero partition for it, it is here with 0).
    """

    modules: list[tuple[str, str, float]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    first_nonfinite_output: str | None = None
    layers: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, float] = field(default_factory=dict, repr=False)

    def brief(self, top: int = 2) -> str:
        """One phrase for a console line: "language_model.layers.3.mlp.down_proj (lora_B) 97%"."""
        if self.nonfinite:
            named = ", ".join(f"{m} ({n})" for m, n in list(self.nonfinite.items())[:top])
            more = f" and {len(self.nonfinite) - top} more" if len(self.nonfinite) > top else ""
            first = f"; first non-finite output: {self.first_nonfinite_output}" if self.first_nonfinite_output else ""
            return f"NaN/Inf gradients in {named}{more}{first}"
        if self.first_nonfinite_output:
            return f"first non-finite output: {self.first_nonfinite_output}"
        shown = [x for x in self.modules[:top] if x[2] >= 0.01] or self.modules[:1]  # "0%" says nothing
        return ", ".join(f"{m} ({part}) {share:.0%}" for m, part, share in shown)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Where:
        """Back from an event's ``where`` value (readers: monitor, report, hints)."""
        return cls(modules=[(m, p, float(s)) for m, p, s in values.get("modules", [])],
                   nonfinite=dict(values.get("nonfinite") or {}),
                   first_nonfinite_output=values.get("first_nonfinite_output"), layers=dict(values.get("layers") or {}))

    def values(self, top: int = 8) -> dict[str, Any]:
        """JSON-ready, for the event log."""
        return {"modules": [[m, p, round(s, 4)] for m, p, s in self.modules[:top]], "nonfinite": self.nonfinite,
                "first_nonfinite_output": self.first_nonfinite_output,
                "layers": dict(list(self.layers.items())[:top])}


def module_of(name: str) -> tuple[str, str]:
    """A parameter's name as (module, part): the model's wrappers' prefixes off, the adapter's name off.

    ``base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.default.weight`` ->
    ``("language_model.layers.3.mlp.down_proj", "lora_B")``.
    """
    suffix = _SUFFIX.search(name)
    part = suffix.group(1) if suffix else "weight"
    name = _SUFFIX.sub("", name)
    adapter = _ADAPTER.search(name)
    if adapter:
        part, name = adapter.group(1), name[: adapter.start()]
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix) and name != prefix.rstrip("."):
                name, changed = name[len(prefix):], True
    return name, part


def modules_of(names: list[str]) -> list[str]:
    """Parameter names as their modules, once each, in order: ``language_model.layers.0.self_attn.q_proj (lora_A)``."""
    return list(dict.fromkeys(_label(*module_of(n)) for n in names))


def layer_of(module: str) -> str:
    """``language_model.layers.3.mlp.down_proj`` -> ``language_model.layers.3``; modules outside numbered
    blocks are their own layer (``lm_head``, ``visual.merger.linear_fc1`` -> ``visual.merger``)."""
    numbered = re.match(r"(.*?\.(?:layers|blocks|h|layer)\.\d+)\b", module)
    if numbered:
        return numbered.group(1)
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def group(names: list[str], norms: list[float]) -> Where:
    """Per-tensor gradient norms (global ones) grouped by module and layer."""
    squares: dict[tuple[str, str], float] = {}
    nonfinite: dict[str, int] = {}
    for name, norm in zip(names, norms):
        module, part = module_of(name)
        if not math.isfinite(norm):
            nonfinite[module] = nonfinite.get(module, 0) + 1
            continue
        if norm > 0:  # a tensor without gradient says nothing about where a step broke
            squares[(module, part)] = squares.get((module, part), 0.0) + norm * norm
    total = sum(squares.values()) or 1.0
    modules = sorted(((m, p, sq / total) for (m, p), sq in squares.items()), key=lambda x: -x[2])
    layers: dict[str, float] = {}
    for module, _, share in modules:
        layers[layer_of(module)] = layers.get(layer_of(module), 0.0) + share
    return Where(modules=modules, nonfinite=nonfinite, layers=dict(sorted(layers.items(), key=lambda x: -x[1])),
                 tensors=dict(zip(names, norms)))


def first_nonfinite_output(model, inputs: dict) -> str | None:
    """Replay ``inputs`` through ``model`` (eval mode, no gradients) with a forward hook on every module; the
    first module (in execution order) whose output holds a NaN or Inf, named without wrappers, or None."""
    import torch

    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            if not found and any(not torch.isfinite(t).all() for t in float_tensors(output)):
                found.append(_label(*module_of(name + ".weight")) if name else type(module).__name__)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    training = model.training
    model.eval()  # no dropout, and hooks that act on training forwards only (fault injectors) stay out
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if not k.startswith("stabguard_")})
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return found[0] if found else None


def _label(module: str, part: str) -> str:
    return module if part == "weight" else f"{module} ({part})"


def float_tensors(output) -> list:
    """The floating-point tensors in a module's output (a tensor, a tuple, a ModelOutput)."""
    import torch

    if torch.is_tensor(output):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in float_tensors(o)]
    if hasattr(output, "values") and callable(output.values):  # ModelOutput and dicts
        return [t for o in output.values() for t in float_tensors(o)]
    return []
