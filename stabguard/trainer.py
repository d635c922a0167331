"""GuardTrainer: the Hugging Face Trainer, with stabguard's hooks fired at the step's seams.

It takes over three seams of ``transformers.Trainer`` (5.24; see docs/design-notes.md) instead of
copying its loop:

- ``_clip_grad_norm`` / ``_get_grad_norm``: called once per optimizer step after gradient accumulation.
  Here the one pass over the gradients happens, guards decide, and the verdict is applied.
- a SKIP drops the gradients and replaces the next ``optimizer.step()`` with a no-op that raises the
  accelerate ``step_was_skipped`` flag, so the Trainer also holds the LR scheduler.
- ``log``: guards add their metrics to the Trainer's own log lines.

The class only fires hooks and applies verdicts; every check lives in a plugin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from stabguard.verdict import Action, GuardError, Verdict, combine

GUARD_STATE_FILE = "stabguard_state.json"


@dataclass
class StepState:
    """One optimizer step as the guards see it.

    ``grad_norm`` (pre-clip global L2 norm) and ``loss`` (mean over the step's micro-batches) are
    device tensors; ``host()`` turns them into floats with one sync shared by every guard.
    """

    step: int
    grad_norm: torch.Tensor
    loss: torch.Tensor
    model: Any = field(repr=False, default=None)
    optimizer: Any = field(repr=False, default=None)
    max_norm: float | torch.Tensor | None = None
    loss_scaled: bool = False  # fp16 AMP: a GradScaler is active (inf gradients may be its overflow)
    verdict: Verdict = field(default_factory=Verdict.proceed)
    _host: dict[str, float] | None = field(default=None, repr=False)

    def host(self) -> dict[str, float]:
        """``{"grad_norm": float, "loss": float}``; the first call syncs, later calls are free."""
        if self._host is None:
            values = torch.stack([self.grad_norm.float(), self.loss.float().to(self.grad_norm.device)]).tolist()
            self._host = {"grad_norm": values[0], "loss": values[1]}
        return self._host

    def clip_to(self, max_norm: float | torch.Tensor) -> None:
        """Ask for the gradients to be clipped to ``max_norm``; the smallest request wins.

        A 0-dim device tensor (an adaptive threshold) is combined and applied without a host sync.
        """
        if self.max_norm is None:
            self.max_norm = max_norm
        elif torch.is_tensor(self.max_norm) or torch.is_tensor(max_norm):
            tensor, other = (self.max_norm, max_norm) if torch.is_tensor(self.max_norm) else (max_norm, self.max_norm)
            self.max_norm = tensor.clamp(max=other)
        else:
            self.max_norm = min(self.max_norm, max_norm)


class _GuardedCollator:
    """Wraps the data collator with ``pre_collate`` and ``post_collate``."""

    def __init__(self, collator, hook, events):
        self.collator, self.hook, self.events = collator, hook, events

    def __call__(self, samples):
        samples = list(samples)
        self.hook.pre_collate(samples=samples, events=self.events)
        batch = self.collator(samples)
        # The collator may drop samples (truncation policy); the guards must see the rows of the batch.
        kept = getattr(self.collator, "last_samples", samples)
        self.hook.post_collate(batch=batch, samples=kept, events=self.events)
        return batch

    def __getattr__(self, name):  # the Trainer inspects collator attributes
        if name.startswith("__") or name == "collator":  # unpickling looks these up before __init__ ran
            raise AttributeError(name)
        return getattr(self.collator, name)


class _HookCallback(TrainerCallback):
    """Fires the hooks that sit on the Trainer's callback events."""

    def __init__(self, trainer: GuardTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.last_step is not None:
            t.plugins.hook.on_step_end(state=t.last_step, events=t.events)
        return self._hold_after_stop(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._hold_after_stop(control)  # epoch strategies would save/evaluate the dropped step

    def _hold_after_stop(self, control):
        if self.trainer.stop_reason is not None:  # the checkpoint of the last good state is already written
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer
        t.plugins.hook.on_train_end(state=t.last_step, reason=t.stop_reason, events=t.events)


class GuardTrainer(transformers.Trainer):
    """``transformers.Trainer`` that fires stabguard's hooks and applies the guards' verdicts.

    :param plugins: a :class:`~stabguard.manager.Plugins` with the run's guards enabled.
    :param events: the run's :class:`~stabguard.events.EventLog`.
    """

    def __init__(self, *args, plugins, events, max_consecutive_skips: int = 20, **kwargs):
        self.plugins, self.events = plugins, events
        self.max_consecutive_skips = max_consecutive_skips
        self.last_step: StepState | None = None
        self.stop_reason: str | None = None
        self.skipped_steps = self.consecutive_skips = 0
        self._window_steps = self._window_dropped = 0  # optimizer steps since the last log line
        self._micro_losses: list[torch.Tensor] = []
        self._tr_loss_at_step_start: torch.Tensor | None = None
        if kwargs.get("data_collator") is not None:
            kwargs["data_collator"] = _GuardedCollator(kwargs["data_collator"], plugins.hook, events)
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # DeepSpeed steps inside backward and keeps gradients out of p.grad; FSDP shards them: the
            # guards would see no gradients or a local norm, and a SKIP could not stop the update.
            raise GuardError("GuardTrainer supports single-device and DDP training; DeepSpeed and FSDP are not "
                             "supported yet (see docs/design-notes.md)")
        # Replaced by the nonfinite guard; the Trainer's version syncs every micro-step and only hides NaN.
        self.args.logging_nan_inf_filter = False
        self.add_callback(_HookCallback(self))

    # -- optimizer ---------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            self.optimizer = self.plugins.hook.make_optimizer(
                model=model, args=self.args, param_groups=self._param_groups(model), events=self.events)
        if self.optimizer is None:
            return super().create_optimizer(model)
        return self.optimizer

    def _param_groups(self, model) -> list[dict]:
        """The Trainer's own grouping: trainable parameters, with and without weight decay."""
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]

    # -- the step ----------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._micro_losses and hasattr(self, "_tr_loss"):
            self._tr_loss_at_step_start = self._tr_loss.detach().clone()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_losses.append(loss)
        return loss

    def _clip_grad_norm(self, model):
        return self._guarded_step(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # Reached without _clip_grad_norm when max_grad_norm == 0: still exactly one guarded pass.
        return self._guarded_step(model) if grad_norm is None else grad_norm

    def _guarded_step(self, model) -> torch.Tensor:
        """Gradients are accumulated: measure once, let the guards decide, apply the verdict."""
        # fp16 AMP: guards must see true gradients (a no-op otherwise; accelerate's own clip does the same).
        self.accelerator.unscale_gradients()
        params = [p for p in model.parameters() if p.grad is not None]
        # One fused pass over the gradients; every guard reads this norm.
        grad_norm = global_grad_norm(params)
        loss = torch.stack(self._micro_losses).sum() if self._micro_losses else torch.zeros((), device=grad_norm.device)
        self._micro_losses = []
        state = StepState(step=self.state.global_step + 1, grad_norm=grad_norm, loss=loss,
                          model=model, optimizer=self.optimizer,
                          loss_scaled=getattr(self.accelerator, "scaler", None) is not None)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            state.clip_to(self.args.max_grad_norm)
        self.last_step = state

        # Guards look, then decide; the most severe verdict wins on every rank.
        self.plugins.hook.post_backward(state=state, events=self.events)
        state.verdict = self._limit_skips(
            agree_across_ranks(combine(self.plugins.hook.pre_step(state=state, events=self.events))))
        self._window_steps += 1

        # Apply: clip and step, or drop this step's update.
        if state.verdict.action == Action.PROCEED:
            if state.max_norm is not None and params:
                clip_with_norm(params, state.max_norm, grad_norm)
            self._mark_step_skipped(False)
        else:
            self._drop_update(model, state)
        if state.verdict.action == Action.STOP:
            self._stop(model, state)
        return grad_norm

    def _limit_skips(self, verdict: Verdict) -> Verdict:
        """Whoever asks for them, too many skips in a row stop the run: a skip must not hide a bug forever."""
        if verdict.action != Action.SKIP:
            self.consecutive_skips = 0
            return verdict
        self.consecutive_skips += 1
        if self.consecutive_skips < self.max_consecutive_skips:
            return verdict
        return Verdict.stop(f"{self.consecutive_skips} steps skipped in a row; last: {verdict.reason}",
                            verdict.guard or "core")

    def _drop_update(self, model, state: StepState) -> None:
        """SKIP: no gradients, no optimizer step, no scheduler step; the logged loss leaves the step out."""
        for p in model.parameters():
            p.grad = None
        self._mark_step_skipped(True)
        if self._tr_loss_at_step_start is not None:
            self._tr_loss.copy_(self._tr_loss_at_step_start)  # a NaN here would poison every later log line
        self._window_dropped += 1
        if state.verdict.action == Action.SKIP:
            self.skipped_steps += 1
            self.events.record(state.verdict.guard or "core", "skip", f"step {state.step} skipped: {state.verdict.reason}",
                               step=state.step, skipped_steps=self.skipped_steps)

    def _mark_step_skipped(self, skipped: bool) -> None:
        optimizer = self.optimizer
        if not skipped:
            if hasattr(optimizer, "_is_overflow") and getattr(optimizer, "scaler", None) is None:
                optimizer._is_overflow = False
            return

        def skipped_step(*args, **kwargs):
            # One call only: restore the real step, and tell the Trainer to hold the scheduler.
            del optimizer.step
            optimizer._is_overflow = True
            if getattr(optimizer, "scaler", None) is not None:
                optimizer.scaler.update()  # closes the unscale_ of this step, as a skipped AMP step does

        optimizer.step = skipped_step

    def _stop(self, model, state: StepState) -> None:
        """STOP: checkpoint the last good state (this step's update was dropped), then end the run."""
        self.stop_reason = f"step {state.step}: {state.verdict.reason}"
        self._save_checkpoint(model, trial=None)
        checkpoint = Path(self._get_output_dir(trial=None)) / f"checkpoint-{self.state.global_step}"
        self.events.record(state.verdict.guard or "core", "stop", f"run stopped at {self.stop_reason}",
                           step=state.step, checkpoint=str(checkpoint))
        self.control.should_training_stop = True

    # -- logs and checkpoints ----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "grad_norm" in logs:  # training log lines, not the final summary
            self._average_over_kept_steps(logs)
            logs["stabguard/skipped_steps"] = self.skipped_steps
            self.plugins.hook.on_log(logs=logs, state=self.last_step, events=self.events)
            # trainer_state.json is only rewritten at checkpoints; this line lets a monitor follow live.
            self.events.record("core", "log", "", step=self.state.global_step, **logs)
        super().log(logs, start_time)

    def _average_over_kept_steps(self, logs: dict) -> None:
        """The Trainer divides the window's loss by all its steps; dropped steps added none."""
        kept = self._window_steps - self._window_dropped
        if "loss" in logs and self._window_dropped:
            if kept > 0:
                logs["loss"] = logs["loss"] * self._window_steps / kept
            else:
                del logs["loss"]  # no step of this window trained: no loss to report
        self._window_steps = self._window_dropped = 0

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            guard_state = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                           "plugins": plugin_states(self.plugins)}
            (folder / GUARD_STATE_FILE).write_text(json.dumps(guard_state, indent=1))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / GUARD_STATE_FILE
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise GuardError(f"{path}: unreadable guard state ({exc}); delete it to resume without it") from None
            self.skipped_steps = saved.get("skipped_steps", 0)
            self.consecutive_skips = saved.get("consecutive_skips", 0)
            load_plugin_states(self.plugins, saved.get("plugins", {}))


def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients in one fused pass (no host sync; NaN/Inf propagate)."""
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=True)


def clip_with_norm(params: list[torch.Tensor], max_norm: float | torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Scale the gradients to at most ``max_norm`` using the step's norm (no second pass).

    torch's ``clip_grads_with_norm_`` calls ``float(max_norm)``, a host sync for a device tensor; clipping
    to 1 with ``grad_norm / max_norm`` gives the same coefficient (up to torch's 1e-6 guard) on the device.
    """
    if torch.is_tensor(max_norm):
        max_norm, grad_norm = 1.0, grad_norm / max_norm.to(grad_norm.device)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)


def agree_across_ranks(verdict: Verdict) -> Verdict:
    """The most severe verdict of any rank, on every rank (a no-op outside distributed runs)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verdict
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    worst = torch.tensor([int(verdict.action)], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if int(worst.item()) == Action.PROCEED:
        return verdict
    # Rare path (a skip or a stop somewhere): gather every rank's reason so all ranks log the same one.
    everyone: list[Verdict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, verdict)
    return combine(everyone)


def plugin_states(plugins) -> dict[str, Any]:
    """``state_dict`` of every plugin that implements it, keyed by plugin name."""
    states = {}
    for impl in plugins.hook.state_dict.get_hookimpls():
        value = impl.function()
        if value is not None:
            states[impl.plugin_name] = value
    return states


def load_plugin_states(plugins, states: dict[str, Any]) -> None:
    for impl in plugins.hook.load_state_dict.get_hookimpls():
        if impl.plugin_name in states:
            impl.function(**{arg: states[impl.plugin_name] for arg in impl.argnames})
