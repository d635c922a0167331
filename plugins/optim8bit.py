"""optim8bit: bitsandbytes AdamW8bit over the trainable parameters only.

The usual AdamW8bit recipe (the fix in recipes/pcb_qwen3vl.toml among them) passed every parameter,
frozen ones included, and fell back with a printed warning when bitsandbytes was missing. Here only
trainable parameters reach the optimizer (the Trainer's own weight-decay grouping), bitsandbytes is
tried on the parameters' device before it is trusted, and a fallback to torch AdamW names the reason.
Optimizer-state bytes per trainable parameter are logged: 8-bit Adam keeps about 2 bytes where torch
AdamW keeps 8 (bitsandbytes keeps tensors under 4096 elements in 32-bit state).
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

from stabguard import GuardOptions, hookimpl, metrics

NAME = "optim8bit"
TRAINER_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused")
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors in 32-bit state (min_8bit_size)


class Options(GuardOptions):
    paged: bool = Field(default=False, description="PagedAdamW8bit: optimizer state in paged (unified) memory")
    fallback: bool = Field(default=True, description="use torch AdamW when bitsandbytes cannot be used")


def adamw8bit_class(paged: bool):
    """The bitsandbytes class (ImportError when bitsandbytes is not installed)."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit


def probe(cls, device: torch.device) -> list[str]:
    """One step on a 4096-element tensor on ``device``: raises if bitsandbytes cannot run there, returns
    what it warned (paged optimizers silently turn unpaged on CPU, say)."""
    if device.type == "meta":  # a skeleton model (``stabguard check``): try where training would run
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    param = torch.nn.Parameter(torch.zeros(4096, device=device))
    param.grad = torch.ones_like(param)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls([param], lr=1e-3).step()
    return [str(w.message).splitlines()[0] for w in caught if "bitsandbytes" in (w.filename or "")]


def state_bytes(optimizer) -> tuple[int, int]:
    """(bytes of optimizer state, trainable parameters); tensors shared between parameters (bitsandbytes'
    quantization maps) are counted once."""
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    seen, n_bytes = set(), 0
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.device.type != "meta":
                key = (t.untyped_storage().data_ptr(), t.device)
                n_bytes += 0 if key in seen else t.untyped_storage().nbytes()
                seen.add(key)
    return n_bytes, n_params


def state_bytes_per_param(optimizer) -> float:
    """Bytes of optimizer state per trainable parameter (after at least one step)."""
    n_bytes, n_params = state_bytes(optimizer)
    return n_bytes / max(n_params, 1)


def describe_groups(groups: list[dict]) -> str:
    return ", ".join(f"{sum(p.numel() for p in g['params']):,} with weight decay {g.get('weight_decay', 0):g}"
                     for g in groups)


class Optim8bitGuard:
    def __init__(self, options: Options):
        self.options = options
        self.optimizer = None
        self.reported = False

    @hookimpl
    def make_optimizer(self, args, param_groups, events):
        kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        groups = [g for g in param_groups if g["params"]]
        optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))  # an OptimizerNames
        if optim is not None and optim not in TRAINER_DEFAULT_OPTIMS:
            events.alert(NAME, f"training.optim = {optim} is replaced by the optim8bit guard; set "
                         "[guards.optim8bit] enabled = false to use it")
        try:
            cls = adamw8bit_class(self.options.paged)
            notes = probe(cls, groups[0]["params"][0].device) if groups else []
            self.optimizer = cls(groups, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any reason bitsandbytes cannot run is reported
            if not self.options.fallback:
                raise
            reason = f"bitsandbytes AdamW8bit unusable ({type(exc).__name__}: {exc}); using torch.optim.AdamW"
            events.alert(NAME, reason, optimizer="AdamW", reason=str(exc))
            self.optimizer = torch.optim.AdamW(groups, **kwargs)
            return self.optimizer
        n = sum(p.numel() for g in groups for p in g["params"])
        small = sum(p.numel() for g in groups for p in g["params"] if p.numel() < MIN_8BIT_SIZE)
        kept = f"; {small:,} of them in tensors under {MIN_8BIT_SIZE} elements keep 32-bit state" if small else ""
        events.record(NAME, "info", f"{cls.__name__} over {n:,} trainable parameters ({describe_groups(groups)})"
                      + kept + "".join(f"; bitsandbytes: {note}" for note in notes),
                      optimizer=cls.__name__, trainable_params=n, params_in_32bit_state=small, notes=notes)
        return self.optimizer

    @hookimpl
    def on_step_end(self, state, events):
        """Once, after the first step that created optimizer state: how much it costs."""
        if self.reported or self.optimizer is None or not self.optimizer.state:
            return
        self.reported = True
        n_bytes, n_params = state_bytes(self.optimizer)
        if not n_params:  # DeepSpeed ZeRO-3 empties the parameters it partitions: no per-parameter figure
            return
        events.record(NAME, "info", f"optimizer state: {n_bytes / max(n_params, 1):.2f} bytes per trainable "
                      f"parameter ({n_bytes / 2**20:.1f} MiB for {n_params:,}){self._why_32bit(n_params)}",
                      step=state.step, state_bytes=n_bytes, trainable_params=n_params, console=True)

    def _why_32bit(self, n_params: int) -> str:
        """8 bytes per parameter from an 8-bit optimizer looks broken unless it says why."""
        small = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"]
                    if p.numel() < MIN_8BIT_SIZE)
        if not small:
            return ""
        share = "all" if small == n_params else f"{small:,} of them"
        return (f"; {share} in tensors under {MIN_8BIT_SIZE} elements, which bitsandbytes keeps in 32-bit "
                "state (8 bytes); 8-bit state (2 bytes) starts at that size")

    @hookimpl
    def on_log(self, logs):
        if self.optimizer is not None and self.optimizer.state:
            logs[metrics.OPTIMIZER_STATE_BYTES_PER_PARAM] = round(state_bytes_per_param(self.optimizer), 3)


@hookimpl
def register_guards(register):
    register(NAME, Options, Optim8bitGuard)
