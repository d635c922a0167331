"""spike: on a loss spike, roll back to the last verified snapshot and skip the batches that led to it.

The core keeps the snapshot (``snapshot_every`` in the recipe): the adapters and their optimizer state,
copied at a step whose loss every guard had just accepted. This guard owns the judgement: a loss far
above its recent history (a z-score over a rolling window), or more non-finite steps in a row than
``nonfinite_streak``, asks for a ROLLBACK. The core restores the snapshot on every rank and records
one ``rollback`` event with the step, the restored step, the samples skipped and those whose updates
were undone. ``max_rollbacks`` within ``rollback_window`` steps, and the next spike stops the run: a
rollback must not hide a bug forever.

After a rollback the loss window is rewound to the restored state (``on_rollback``): the losses of
the undone steps leave it, so the restored weights are judged against their own history, not against
the better losses the undone updates had reached.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from pydantic import Field, ValidationInfo, field_validator

from stabguard import GuardOptions, Verdict, hookimpl
from stabguard.verdict import Action

NAME = "spike"


class Options(GuardOptions):
    window: int = Field(default=100, ge=2, description="recent losses a step's loss is compared with")
    min_history: int = Field(default=20, ge=2, description="losses in the window before spikes are judged")
    z: float = Field(default=6.0, gt=0, description="loss z-score over the window that counts as a spike")
    nonfinite_streak: int = Field(default=3, ge=0, description="non-finite steps in a row that roll back; "
                                  "keep it below nonfinite.max_consecutive; 0: never")
    max_rollbacks: int = Field(default=3, ge=1, description="rollbacks within rollback_window before a stop")
    rollback_window: int = Field(default=500, ge=1, description="steps over which rollbacks are counted")

    @field_validator("min_history")
    @classmethod
    def _fits_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"min_history ({value}) must not exceed window ({window})")
        return value


class SpikeGuard:
    def __init__(self, options: Options):
        self.options = options
        self.losses: deque[tuple[int, float]] = deque(maxlen=options.window)  # (step, loss) of trained steps
        self.rollbacks: list[int] = []  # steps at which the (agreed) rollbacks happened
        self.nonfinite_streak = 0

    @hookimpl
    def pre_step(self, state):
        spike = self._spike(state.host())
        if spike is None:
            return None
        recent = [s for s in self.rollbacks if state.step - s < self.options.rollback_window]
        if len(recent) >= self.options.max_rollbacks:
            return Verdict.stop(f"{spike}, after {len(recent)} rollbacks within "
                                f"{self.options.rollback_window} steps", NAME, healable=True)
        return Verdict.rollback(spike, NAME)

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
        history = [value for _, value in self.losses]
        mean, std = statistics.fmean(history), statistics.pstdev(history)
        z = (loss - mean) / std if std > 0 else 0.0
        if z <= opts.z:
            return None
        return f"loss {loss:.4g} is {z:.1f} sigma above the mean {mean:.4g} of the last {len(history)} steps"

    @hookimpl
    def on_rollback(self, state, restored_step):
        # The loss of step restored_step + 1 came from the restored weights; later ones from undone updates.
        kept = [(step, loss) for step, loss in self.losses if step <= restored_step + 1]
        self.losses = deque(kept, maxlen=self.options.window)

    @hookimpl
    def on_step_end(self, state):
        action = state.verdict.action
        if action == Action.ROLLBACK and state.verdict.decided_by(NAME):
            window = self.options.rollback_window
            self.rollbacks = [s for s in self.rollbacks if state.step - s < window] + [state.step]
            self.nonfinite_streak = 0
        elif action == Action.PROCEED:
            loss = state.host()["loss"]
            if math.isfinite(loss):
                self.losses.append((state.step, loss))

    # -- checkpoints ---------------------------------------------------------------------------------

    @hookimpl
    def state_dict(self):
        return {"losses": [list(pair) for pair in self.losses], "rollbacks": list(self.rollbacks),
                "nonfinite_streak": self.nonfinite_streak}

    @hookimpl
    def load_state_dict(self, state):
        pairs = [(int(s), float(v)) for s, v in state["losses"]]
        self.losses = deque(pairs, maxlen=self.options.window)
        self.rollbacks, self.nonfinite_streak = list(state["rollbacks"]), state["nonfinite_streak"]


@hookimpl
def register_guards(register):
    register(NAME, Options, SpikeGuard)
