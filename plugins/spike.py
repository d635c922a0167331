"""spike: on a loss spike, roll back to an in-memory snapshot and skip the batches that led to it.

With LoRA the trainable state (adapter weights and their optimizer state) is small enough to copy in
memory every ``every`` steps. A loss far above its recent history (a z-score over a rolling window), or
more non-finite steps in a row than ``nonfinite_streak``, restores that copy and skips the step; the
event names the samples skipped and those whose updates the rollback undid. ``max_rollbacks`` within
``rollback_window`` steps, and the next spike stops the run: a rollback must not hide a bug forever.

Each rank judges its own loss, so ranks may disagree. ``pre_step`` only asks for the rollback (a SKIP
naming this guard); the snapshot is restored in ``on_step_end`` from the verdict the core agreed
across ranks, so every rank restores together or none does.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from pathlib import Path

import torch
from pydantic import Field, ValidationInfo, field_validator

from stabguard import GuardOptions, Verdict, hookimpl
from stabguard.verdict import Action

NAME = "spike"


class Options(GuardOptions):
    every: int = Field(default=50, ge=1, description="steps between in-memory snapshots")
    window: int = Field(default=100, ge=2, description="recent losses a step's loss is compared with")
    min_history: int = Field(default=20, ge=2, description="losses in the window before spikes are judged")
    z: float = Field(default=6.0, gt=0, description="loss z-score over the window that counts as a spike")
    nonfinite_streak: int = Field(default=3, ge=0, description="non-finite steps in a row that roll back; "
                                  "keep it below nonfinite.max_consecutive; 0: never")
    max_rollbacks: int = Field(default=3, ge=1, description="rollbacks within rollback_window before a stop")
    rollback_window: int = Field(default=500, ge=1, description="steps over which rollbacks are counted")
    offload: bool = Field(default=False, description="keep the snapshot in CPU memory, not on the device")

    @field_validator("min_history")
    @classmethod
    def _fits_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"min_history ({value}) must not exceed window ({window})")
        return value


def _keep(value, offload: bool):
    if not torch.is_tensor(value):
        return copy.deepcopy(value), None
    return value.detach().to("cpu" if offload else value.device, copy=True), value.device


class Snapshot:
    """Copies of the trainable parameters and their optimizer state, as they were after ``step``."""

    def __init__(self, step: int, params: list[torch.Tensor], optimizer, offload: bool):
        self.step = step
        self.params = [(p, _keep(p, offload)[0]) for p in params]
        self.optim = {p: {k: _keep(v, offload) for k, v in optimizer.state[p].items()}
                      for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        for p, saved in self.params:
            p.copy_(saved)
            if p in self.optim:
                optimizer.state[p] = _put_back(optimizer.state.get(p, {}), self.optim[p])
            else:  # no state yet at snapshot time: the optimizer starts it afresh, as it did then
                optimizer.state.pop(p, None)


def _put_back(live: dict, saved: dict) -> dict:
    """Saved optimizer state, copied into the live tensors where they still fit (paged or quantized
    state keeps its storage), as fresh copies where not."""
    out = {}
    for key, (value, device) in saved.items():
        old = live.get(key)
        if torch.is_tensor(old) and old.shape == value.shape and old.dtype == value.dtype:
            out[key] = old.copy_(value)
        else:
            out[key] = value.to(device, copy=True) if device is not None else copy.deepcopy(value)
    return out


class SpikeGuard:
    def __init__(self, options: Options):
        self.options = options
        self.losses: deque[float] = deque(maxlen=options.window)
        self.rollbacks: list[int] = []  # steps at which the (agreed) rollbacks happened
        self.nonfinite_streak = 0
        self.snapshot: Snapshot | None = None
        self.val_prefix: str | None = None
        self.pending: deque[list[str]] = deque()  # sample ids of collated, not yet trained micro-batches
        self.step_ids: list[str] = []  # samples of this step's micro-batches
        self.undone: dict[int, list[str]] = {}  # samples of the steps a rollback would undo

    # -- which samples each step trained on ---------------------------------------------------------

    @hookimpl
    def configure(self, recipe):
        val = getattr(recipe.data, "val", None)
        self.val_prefix = f"{Path(val)}:" if val else None

    @hookimpl
    def setup_model(self, model):
        # The data loader collates ahead of training; a training forward consumes the oldest collated
        # micro-batch, which maps sample ids to steps exactly.
        model.register_forward_pre_hook(self._consumed)

    def _consumed(self, module, args) -> None:
        if module.training and self.pending:
            self.step_ids += self.pending.popleft()

    @hookimpl
    def post_collate(self, samples):
        ids = [str(s.get("id")) for s in samples]
        if not (self.val_prefix and ids and ids[0].startswith(self.val_prefix)):  # evaluation batches
            self.pending.append(ids)

    # -- the step ----------------------------------------------------------------------------------

    @hookimpl
    def pre_step(self, state):
        if self.snapshot is None:  # the state the first (or the resumed) step starts from
            self.snapshot = self._take(state.step - 1, state)
        spike = self._spike(state.host())
        if spike is None:
            return None
        recent = [s for s in self.rollbacks if state.step - s < self.options.rollback_window]
        if len(recent) >= self.options.max_rollbacks:
            return Verdict.stop(f"{spike}, after {len(recent)} rollbacks within "
                                f"{self.options.rollback_window} steps", NAME)
        return Verdict.skip(f"{spike}; rolling back to the snapshot of step {self.snapshot.step}", NAME)

    def _spike(self, values: dict[str, float]) -> str | None:
        """Why this step is a spike, or None."""
        loss, opts = values["loss"], self.options
        if not (math.isfinite(loss) and math.isfinite(values["grad_norm"])):
            self.nonfinite_streak += 1
            if opts.nonfinite_streak and self.nonfinite_streak >= opts.nonfinite_streak:
                return f"{self.nonfinite_streak} non-finite steps in a row"
            return None
        self.nonfinite_streak = 0
        if len(self.losses) < opts.min_history:
            return None
        mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
        z = (loss - mean) / std if std > 0 else 0.0
        if z <= opts.z:
            return None
        return f"loss {loss:.4g} is {z:.1f} sigma above the mean {mean:.4g} of the last {len(self.losses)} steps"

    @hookimpl
    def on_step_end(self, state, events):
        if state.verdict.action == Action.SKIP and state.verdict.decided_by(NAME):
            self._roll_back(state, events)
        elif state.verdict.action == Action.PROCEED:
            loss = state.host()["loss"]
            if math.isfinite(loss):
                self.losses.append(loss)
            self.undone[state.step] = self.step_ids
            if self.snapshot is None or state.step - self.snapshot.step >= self.options.every:
                self.snapshot = None  # free the old copy before making the new one
                self.snapshot, self.undone = self._take(state.step, state), {}
        self.step_ids = []

    def _take(self, step: int, state) -> Snapshot:
        params = [p for p in state.model.parameters() if p.requires_grad]
        return Snapshot(step, params, state.optimizer, self.options.offload)

    def _roll_back(self, state, events) -> None:
        self.snapshot.restore(state.optimizer)
        window = self.options.rollback_window
        self.rollbacks = [s for s in self.rollbacks if state.step - s < window] + [state.step]
        self.nonfinite_streak = 0
        undone, self.undone = self.undone, {}
        message = (f"step {state.step}: restored the snapshot of step {self.snapshot.step}, skipped "
                   f"{len(self.step_ids)} sample(s) of this step, undid {len(undone)} step(s) since the snapshot "
                   f"({state.verdict.reason})")
        events.record(NAME, "rollback", message, step=state.step, snapshot_step=self.snapshot.step,
                      skipped_samples=self.step_ids, undone_samples=undone, recent_rollbacks=len(self.rollbacks))
        events.alert(NAME, f"rolled back to step {self.snapshot.step} at step {state.step}", step=state.step)

    # -- checkpoints (the snapshot is not saved: a resumed run snapshots its first step) -----------

    @hookimpl
    def state_dict(self):
        return {"losses": list(self.losses), "rollbacks": self.rollbacks, "nonfinite_streak": self.nonfinite_streak}

    @hookimpl
    def load_state_dict(self, state):
        self.losses = deque(state["losses"], maxlen=self.options.window)
        self.rollbacks, self.nonfinite_streak = list(state["rollbacks"]), state["nonfinite_streak"]


@hookimpl
def register_guards(register):
    register(NAME, Options, SpikeGuard)
