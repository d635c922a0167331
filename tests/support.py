"""Shared helpers for tests that run the real trainer on the tiny demo model (imported, not a fixture file)."""

from __future__ import annotations

from stabguard import hookimpl
from stabguard.manager import HOOK_NAMES
from stabguard.testing import tiny_recipe, toml_dumps, toml_value, write_recipe  # noqa: F401 - one copy, public

# The Qwen3-VL chat format, as qwen3vl.md gives it: one user turn with an image, one assistant turn.
REFERENCE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Inspect this PCB.<|im_end|>\n"
    "<|im_start|>assistant\nDefect: open circuit.<|im_end|>\n"
)
CONVERSATION = [
    {"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "Inspect this PCB."},
    ]},
    {"role": "assistant", "content": "Defect: open circuit."},
]


class HookRecorder:
    """Implements every hook (called first, ``tryfirst``) and records the order in which they fire."""

    def __init__(self):
        self.calls: list[str] = []


def _recording(name: str):
    def impl(self):
        self.calls.append(name)

    impl.__name__ = name
    return hookimpl(tryfirst=True)(impl)


for _name in HOOK_NAMES:
    if _name not in ("register_guards",):
        setattr(HookRecorder, _name, _recording(_name))
