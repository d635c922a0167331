"""stabguard: guards that check and act, for stable fine-tuning on the Hugging Face Trainer.

The public API for plugins and scripts. Heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

import logging

import pluggy

from stabguard.events import Alert, EventLog
from stabguard.options import GuardOptions
from stabguard.verdict import Action, GuardError, Verdict

__version__ = "0.1.0"
IGNORE_INDEX = -100  # the label value the loss leaves out (transformers' and torch's ignore_index)
# Here and not in hookspecs: the specs name the step's and the recipe's types, which import this package.
hookimpl = pluggy.HookimplMarker("stabguard")

# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package is absent;
# it only means CPU 4-bit matmuls use its slower built-in path (which stabguard never uses: 4-bit is GPU-only
# here), yet it showed on every command and benchmark.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

__all__ = [
    "IGNORE_INDEX", "Action", "Alert", "EventLog", "GuardError", "GuardOptions", "GuardTrainer", "Remedy",
    "StepState", "Verdict", "guarded", "hookimpl", "load_recipe", "run",
]

_LAZY = {
    "GuardTrainer": "stabguard.trainer",
    "Remedy": "stabguard.recovery",
    "StepState": "stabguard.trainer",
    "guarded": "stabguard.trainer",
    "load_recipe": "stabguard.recipe",
    "run": "stabguard.runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stabguard' has no attribute {name!r}")
