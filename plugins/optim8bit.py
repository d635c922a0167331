"""optim8bit: bitsandbytes AdamW8bit over the trainable parameters only.

The source note passed every parameter, frozen ones included, and fell back silently-ish when
bitsandbytes was missing. Here only trainable parameters reach the optimizer (with the Trainer's
weight-decay grouping), and a fallback to torch AdamW names the reason.
"""

from __future__ import annotations

import torch
from pydantic import Field

from stabguard import GuardOptions, hookimpl

NAME = "optim8bit"


class Options(GuardOptions):
    paged: bool = Field(default=False, description="PagedAdamW8bit: optimizer state in paged (unified) memory")
    fallback: bool = Field(default=True, description="use torch AdamW when bitsandbytes cannot be used")


def adamw8bit_class(paged: bool):
    """The bitsandbytes class, or raise ImportError/RuntimeError saying why it cannot be used."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit


def state_bytes_per_param(optimizer) -> float:
    """Bytes of optimizer state per trainable parameter (after at least one step)."""
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    n_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                  for t in s.values() if torch.is_tensor(t))
    return n_bytes / max(n_params, 1)


class Optim8bitGuard:
    def __init__(self, options: Options):
        self.options = options
        self.optimizer = None

    @hookimpl
    def make_optimizer(self, args, param_groups, events):
        kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        groups = [g for g in param_groups if g["params"]]
        try:
            cls = adamw8bit_class(self.options.paged)
            self.optimizer = cls(groups, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any reason bitsandbytes cannot run is reported
            if not self.options.fallback:
                raise
            reason = f"bitsandbytes AdamW8bit unavailable ({type(exc).__name__}: {exc}); using torch.optim.AdamW"
            events.alert(NAME, reason)
            self.optimizer = torch.optim.AdamW(groups, **kwargs)
            return self.optimizer
        n = sum(p.numel() for g in groups for p in g["params"])
        events.record(NAME, "info", f"{cls.__name__} over {n:,} trainable parameters", optimizer=cls.__name__,
                      trainable_params=n)
        return self.optimizer

    @hookimpl
    def on_log(self, logs):
        if self.optimizer is not None and self.optimizer.state:
            logs["stabguard/optimizer_state_bytes_per_param"] = round(state_bytes_per_param(self.optimizer), 3)


@hookimpl
def register_guards(register):
    register(NAME, Options, Optim8bitGuard)
