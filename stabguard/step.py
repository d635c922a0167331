"""The guarded optimizer step, top to bottom: measure -> decide -> agree -> apply -> notify.

The training loop around it (``GuardTrainer``, through :class:`StepHost`) calls :meth:`GuardedStep.run`
once per optimizer step, after the gradients of every micro-batch are accumulated and before the update
(``optimizer.step()``; under DeepSpeed, inside ``backward`` before ``engine.step()``). The
:class:`~stabguard.engine.Engine` it is given (:class:`~stabguard.engine.TorchEngine` or
:class:`~stabguard.zero.ZeroEngine`) measures, clips, drops and snapshots where the gradients live:

- **measure**: one pass over the gradients gives the global norm; the step's loss is the sum of its
  micro-batch losses as the Trainer scaled them for accumulation (their mean, each micro-batch averaging
  its own tokens), as logged. Both stay on the device; ``StepState.host()`` is the one shared sync.
- **decide**: ``post_backward``, then ``pre_step`` verdicts, plus the held verdicts: the data hooks' for
  this step's micro-batches, and the failures of hooks that ran after the last agreement. A hook that
  raises becomes a STOP naming the hook, plugin, rank and samples.
- **agree**: the most severe verdict of any rank, on every rank (STOP > ROLLBACK > SKIP > PROCEED).
- **apply**: PROCEED takes a snapshot when one is due, then clips; SKIP drops the gradients and holds the
  optimizer and the LR scheduler; ROLLBACK is a SKIP that also restores the last verified snapshot;
  STOP restores it too, has the host save it as a checkpoint, and ends the run.
- **diagnose, heal**: a step that did not proceed is replayed (:mod:`stabguard.replay`: the same weights
  for the hardware, the weights now in place for a loss per sample) and the agreed diagnosis goes to
  :class:`~stabguard.recovery.Recovery`, which quarantines exactly the samples the evidence names and turns
  a healable STOP into a ROLLBACK with the remedy the evidence picks, while the budget lasts.
- **notify**: an event for every step that did not proceed (skip, rollback, stop); ``on_step_end`` after
  the host has applied the step.

A snapshot is only ever *verified*: it is taken at a PROCEED decision, just before the update, so the
weights it holds are the ones whose loss every guard has just judged finite and not a spike.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from stabguard import replay, seams
from stabguard.engine import Engine, GradientArrival, Snapshot, SnapshotLike
from stabguard.recipe_schema import RecoverySection, SnapshotSection
from stabguard.recovery import Recovery
from stabguard.replay import Evidence, Micro
from stabguard.verdict import Action, HookError, Verdict, combine, from_failure
from stabguard.where import Where, first_nonfinite_output, group, module_of, modules_of

__all__ = ["GuardedStep", "Snapshot", "StepHost", "StepState", "agree_across_ranks", "load_plugin_states",
           "plugin_states"]


@dataclass
class StepState:
    """One optimizer step as the guards see it.

    :ivar step: the optimizer step being decided, 1-based (the Trainer's ``global_step`` after it).
    :ivar grad_norm: pre-clip global L2 norm of the accumulated gradients (0-dim device tensor).
    :ivar loss: the step's loss as logged: the sum of its micro-batch losses as the Trainer scaled them for
        accumulation, i.e. their mean (0-dim device tensor).
    :ivar model: the model being trained (under DeepSpeed, its engine: a ``torch.nn.Module`` too).
    :ivar optimizer: the optimizer (accelerate-wrapped).
    :ivar samples: ids of the samples of this step's micro-batches, in order.
    :ivar max_norm: the clip requested so far (``clip_to``), or None.
    :ivar loss_scaled: fp16 AMP: a GradScaler is active (inf gradients may be its overflow).
    :ivar verdict: the agreed verdict, set before ``on_step_end``.
    :ivar restored_step: after a ROLLBACK or STOP, the step whose state was restored, else None.
    :ivar where: on an anomalous step (not PROCEED, or one a guard asked about with ``ask_where()``), a
        :class:`~stabguard.where.Where`: the modules the grad norm came from, the tensors holding NaN/Inf,
        the first non-finite output. Set after the agreement, before the update is applied or dropped:
        read it from ``on_rollback``, ``on_step_end`` or ``on_log`` on. None on healthy steps.
    """

    step: int
    grad_norm: torch.Tensor
    loss: torch.Tensor
    model: Any = field(repr=False, default=None)
    optimizer: Any = field(repr=False, default=None)
    samples: list[str] = field(default_factory=list)
    max_norm: float | torch.Tensor | None = None
    loss_scaled: bool = False
    verdict: Verdict = field(default_factory=Verdict.proceed)
    restored_step: int | None = None
    where: Where | None = None
    _where_asked: bool = field(default=False, repr=False)
    _host: dict[str, float] | None = field(default=None, repr=False)

    def ask_where(self) -> None:
        """From ``pre_step``: have the core work out where this step's gradients came from, on every rank
        (as it does for every step that does not proceed); ``state.where`` holds it from ``on_step_end``."""
        self._where_asked = True

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


class StepHost(Protocol):
    """What the guarded step needs of the training loop it runs in; ``GuardTrainer`` provides it."""

    optimizer: Any  # the (accelerate-wrapped) optimizer

    def next_step(self) -> int:
        """The optimizer step about to be decided, 1-based."""

    def max_grad_norm(self) -> float | None:
        """The run's own clip (``training.max_grad_norm``), or None."""

    def unscale_gradients(self) -> None:
        """fp16 AMP: divide the gradients by the loss scale before they are measured."""

    def save_stopped(self, model) -> str | None:
        """Write the current (restored) state as a checkpoint; its folder, or None when no step ran."""

    def end_training(self) -> None:
        """Make the loop stop after this step."""

    def replay_model(self, model):
        """``model`` as a forward on this rank alone runs it (unwrapped from DDP), for a replay."""

    def scale_lr(self, factor: float) -> tuple[float, float]:
        """Multiply every group's learning rate, now and in the scheduler's later steps (its shape kept);
        returns the first group's learning rate before and after."""

    def lr(self) -> float:
        """The first group's learning rate now."""

    def peak_lr(self) -> float:
        """The scheduler's base rate of the first group (the rate it warms up to), or the rate now."""


@dataclass
class Stopped:
    """How a run ended by a STOP: what the step was and what its checkpoint holds."""

    step: int
    verdict: Verdict
    verified_step: int | None  # the step after which the saved state was taken; None: not verified
    guard_state: dict

    @property
    def reason(self) -> str:
        return f"step {self.step}: {self.verdict.reason}"


class GuardedStep:
    """The core's side of every optimizer step: counters, held verdicts, the verified snapshot, a STOP."""

    def __init__(self, plugins, events, *, max_consecutive_skips: int = 20, snapshot_every: int = 1,
                 snapshot_offload: bool = False, recovery: RecoverySection | None = None,
                 snapshots: SnapshotSection | None = None):
        self.plugins, self.events = plugins, events
        self.recovery = Recovery(recovery, events)
        self.heal_on_resume = False  # `stabguard run --resume ... --heal`: a STOP's checkpoint gets a remedy
        self.max_consecutive_skips = max_consecutive_skips
        self.snapshot_every, self.snapshot_offload = snapshot_every, snapshot_offload
        self.ring_size, self.ring_every = (snapshots.ring, snapshots.ring_every) if snapshots else (2, 20)
        self.skipped_steps = self.consecutive_skips = self.rollbacks = 0
        self.dropped_this_run = 0  # skipped, rolled back or stopped steps since train() started
        self.snapshot: SnapshotLike | None = None
        self.ring: list[SnapshotLike] = []  # earlier verified snapshots, oldest first (a rewind's targets)
        self.since_snapshot: dict[int, list[str]] = {}  # samples of the updates a restore would undo
        self.micro: list[Micro] = []  # this step's micro-batches, kept until it decides (a replay needs them)
        self.samples: list[str] = []
        self.micro_batches = self.micro_quarantined = 0  # this step's, and those wholly quarantined
        # Verdicts that join the next decision: the data hooks' for this step's micro-batches, evaluation
        # data's STOPs, and the failures of hooks that ran after the last agreement.
        self.held: list[Verdict] = []
        self.stopped: Stopped | None = None
        self.reach_checked = False
        self.arrival: GradientArrival | None = None  # hooks armed for the first step (GuardTrainer.train)

    # -- what the micro-batches bring -------------------------------------------------------------

    def add_micro_batch(self, samples: list[str], verdict: Verdict | None, quarantined: bool = False,
                        inputs: dict | None = None, images: list[int] | None = None) -> None:
        """A micro-batch of this step: its samples (those it trains on, one per row of ``inputs``), its data
        verdict (held until the step decides), whether every row of it was quarantined (nothing to train
        on), and its inputs on the device with the images of each row (kept for a replay; not copied)."""
        self.samples += samples
        self.micro.append(Micro(inputs or {}, list(samples), list(images or [])))
        self.micro_batches += 1
        self.micro_quarantined += quarantined
        if verdict is not None:
            self.held.append(verdict)

    def add_forward(self, loss: torch.Tensor | None, rng: tuple, extra: dict) -> None:
        """The model's own loss for the micro-batch being trained, the RNG state its forward started from
        and the keyword arguments it got besides its inputs: a replay reproduces it from these."""
        if self.micro:
            self.micro[-1].loss, self.micro[-1].rng, self.micro[-1].extra = loss, rng, extra

    def add_loss(self, loss: torch.Tensor) -> None:
        """The loss of a micro-batch of this step, as it went into backward."""
        if not self.micro:
            self.micro.append(Micro({}, [], []))
        self.micro[-1].step_loss = loss

    # -- the step ----------------------------------------------------------------------------------

    def run(self, host: StepHost, model, engine: Engine) -> StepState:
        """One optimizer step; ``engine`` acts on the gradients where the training engine keeps them."""
        hook = self.plugins.hook

        # Measure: one pass over the (fp16: unscaled) gradients; every guard reads this norm. FSDP2: the
        # shards' norms meet in one collective; DeepSpeed: its own norm over the ZeRO partitions.
        host.unscale_gradients()
        grad_norm = engine.grad_norm(model)
        losses = [m.step_loss for m in self.micro if m.step_loss is not None]
        loss = torch.stack(losses).sum() if losses else torch.zeros((), device=grad_norm.device)
        if 0 < self.micro_quarantined < self.micro_batches:  # a wholly quarantined micro-batch's 0 is no loss
            loss = loss * (self.micro_batches / (self.micro_batches - self.micro_quarantined))
        state = StepState(step=host.next_step(), grad_norm=grad_norm, loss=loss, model=model,
                          optimizer=host.optimizer, samples=self.samples,
                          loss_scaled=seams.grad_scaler(host.optimizer) is not None)
        micro, self.micro, self.samples = self.micro, [], []
        nothing_left = 0 < self.micro_batches == self.micro_quarantined
        self.micro_batches = self.micro_quarantined = 0
        if not self.reach_checked:  # the first step: a trainable tensor without a gradient never trains
            self.reach_checked = True
            arrival, self.arrival = self.arrival, None
            unreached = arrival.unreached(model) if arrival is not None else []
            self._check_reach(engine.missing_gradients(model) or unreached, state.step)
        if host.max_grad_norm():
            state.clip_to(host.max_grad_norm())
        self.recovery.steady(state, host)  # a tightened clip; the end of a cool-down
        if self.recovery.pending:  # resumed with --heal from a STOP's checkpoint
            self.recovery.heal_pending(state, host, Healing(self, state, engine))

        # Decide: the guards' verdicts and the held ones; a hook that raises stops the run.
        verdicts, self.held = self.held, []
        if nothing_left:  # an update from no sample would still move the weights (momentum, weight decay)
            verdicts.append(Verdict.skip("every sample of this step is quarantined: nothing to train on"))
        try:
            hook.post_backward(state=state, events=self.events)
            verdicts += hook.pre_step(state=state, events=self.events)
        except HookError as exc:
            verdicts.append(self.failed(exc, state.step, state.samples))
        verdict = self._limit_skips(combine(verdicts))

        # Agree: the most severe verdict of any rank, with its reason, on every rank; and whether to say
        # where the step broke (every step that does not proceed, and any a guard asked about).
        state.verdict, asked = agree_across_ranks(verdict, state._where_asked)
        rejected = state.verdict.action != Action.PROCEED
        if asked or rejected:
            state.where = self._locate(host, state, engine, micro)

        # Replay on the step's own weights: a different loss from the same weights, inputs and RNG is the
        # hardware. A healable STOP with room in the recovery budget becomes a ROLLBACK, healed below.
        replayable = rejected and self.recovery.options.enabled and engine.replayable(model)
        mismatches = self._determinism(host, state, micro) if replayable else []
        if rejected:
            self.recovery.admit(state)

        # Apply.
        action = state.verdict.action
        if action == Action.PROCEED:
            self._snapshot_if_due(state, engine)
            if state.max_norm is not None:
                engine.clip(model, state.max_norm, grad_norm)
            self.since_snapshot[state.step] = state.samples
            engine.proceed(host.optimizer)
        else:
            engine.drop(model, host.optimizer)  # no update; the optimizer and the LR scheduler hold
            self.dropped_this_run += 1
        if action == Action.ROLLBACK:
            self._roll_back(state)

        # Diagnose and heal: each sample's loss replayed on the weights now in place (the verified state
        # after a rollback); the evidence of every rank picks the remedy, or gives a healed STOP back.
        if rejected:
            self._heal(host, state, engine, micro if replayable else [], mismatches)
        if state.verdict.action == Action.STOP:
            self._stop(host, state)

        # Notify (``on_step_end`` fires once the host has applied the step).
        self._record(state)
        self.recovery.remember(state.step, host.lr(), state._host["loss"] if state._host else None)
        return state

    def _locate(self, host: StepHost, state: StepState, engine: Engine, micro: list) -> Where:
        """Where an anomalous step broke, before its update is applied or dropped (every rank: collectives)."""
        names, norms = engine.tensor_norms(state.model)
        where = group(names, norms.tolist())
        kept = [m for m in micro if m.step_loss is not None and m.inputs]
        losses = torch.stack([m.step_loss.float() for m in kept]).tolist() if kept else []
        replay = next((m.inputs for value, m in zip(losses, kept) if not math.isfinite(value)), None)
        first = None
        if replay is not None and engine.replayable(state.model):
            first = first_nonfinite_output(host.replay_model(state.model), replay)
        where.first_nonfinite_output = first_across_ranks(first)
        return where

    def _determinism(self, host: StepHost, state: StepState, micro: list[Micro]) -> list[dict]:
        model = host.replay_model(state.model)
        return self._replaying(state, lambda: replay.check_determinism(
            model, micro, _rank(), lambda m: m.extra, self.recovery.options.replay_tolerance)) or []

    def _replaying(self, state: StepState, call):
        """A replay that raises is an error event, not a crash: the step goes on without its evidence."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, the run keeps its verdict
            self.events.record("core", "error", f"step {state.step}: the replay failed ({type(exc).__name__}: "
                               f"{exc}); no evidence for this step", step=state.step, exception=type(exc).__name__)
            return None

    def _heal(self, host: StepHost, state: StepState, engine: Engine, micro: list[Micro],
              mismatches: list[dict]) -> None:
        if not self.recovery.options.enabled:
            return
        evidence = Evidence(reference=loss_of(self.snapshot), best=self._best(),
                            factor=self.recovery.options.evidence_factor, mismatches=mismatches)
        gathered = micro and self._replaying(state, lambda: replay.gather(host.replay_model(state.model), micro,
                                                                           evidence))
        evidence = evidence_across_ranks(evidence if gathered else Evidence(mismatches=mismatches))
        self._say_hardware(state.step, evidence.mismatches)
        diagnosis = replay.classify(evidence)
        try:
            self.recovery.heal(state, diagnosis, host, self.plugins.hook, Healing(self, state, engine))
        except HookError as exc:  # a guard's remedy failed: the STOP stands, the failure is recorded
            state.verdict = self.recovery.spent(state, f"the remedy of {exc.plugin} failed")
            self.held.append(self.failed(exc, state.step, state.samples))

    def _best(self) -> float | None:
        """The loss the best verified state kept was accepted with (its weights produced it)."""
        losses = [loss_of(s) for s in [*self.ring, self.snapshot] if s is not None and loss_of(s) is not None]
        finite = [v for v in losses if math.isfinite(v)]
        return min(finite) if finite else None

    def _say_hardware(self, step: int, mismatches: list[dict]) -> None:
        for m in mismatches:
            message = (f"step {step}: rank {m['rank']}, micro-batch {m['micro']}: the replay of the same weights, "
                       f"inputs and RNG state gave loss {m['replay']:.6g}, the step gave {m['step']:.6g}: "
                       "non-deterministic hardware or silent data corruption on that rank")
            self.events.record("core", "finding", message, step=step, hardware=m, console=True)
            self.events.alert("core", message, step=step)

    def _check_reach(self, missing: list[str], step: int) -> None:
        """A finding when trainable tensors got no gradient (``p.grad is None``: no sync to ask)."""
        if not missing:
            return
        modules = modules_of(missing)
        self.events.record("core", "finding", f"{len(missing)} trainable tensors got no gradient at step {step}, "
                           f"e.g. {', '.join(modules[:3])}: the gradient path is cut before them and they will "
                           "never train (the loss can still fall); `stabguard check RECIPE --probe` lists them all",
                           step=step, missing=missing)

    def failed(self, exc: HookError, step: int | None, samples: list[str]) -> Verdict:
        """A hook raised on this rank: an error event here, a STOP for everyone at the agreement."""
        exc.samples = exc.samples or list(samples)
        self.events.record(exc.plugin, "error", str(exc), step=step, hook=exc.hook, plugin=exc.plugin,
                           exception=type(exc.cause).__name__, samples=exc.samples)
        return from_failure(exc)

    def _limit_skips(self, verdict: Verdict) -> Verdict:
        """Whoever asks for them, too many dropped steps in a row stop the run: a skip must not hide a bug."""
        if verdict.action not in (Action.SKIP, Action.ROLLBACK):
            self.consecutive_skips = 0
            return verdict
        self.consecutive_skips += 1
        if self.consecutive_skips < self.max_consecutive_skips:
            return verdict
        return Verdict.stop(f"{self.consecutive_skips} steps skipped in a row; last: {verdict.reason}",
                            verdict.guard or "core")

    def _snapshot_if_due(self, state: StepState, engine) -> None:
        """The weights about to be updated produced this step's loss, which every guard just accepted."""
        if not self.snapshot_every:
            return
        if self.snapshot is not None and state.step - 1 - self.snapshot.step < self.snapshot_every:
            return
        self._keep_in_ring(self.snapshot)
        self.snapshot = None  # free the old copy (unless the ring keeps it) before making the new one
        guard_state = self._after_agreement(state, lambda: copy.deepcopy(plugin_states(self.plugins)))
        self.snapshot = engine.snapshot(state.step - 1, state.model, state.optimizer, self.snapshot_offload,
                                        guard_state)
        self.snapshot.loss = state.loss.detach()  # the loss these weights produced, just accepted
        self.since_snapshot = {}

    def rewind_target(self) -> SnapshotLike | None:
        """The ring's snapshot with the lowest loss, if it is lower than the last verified one's."""
        now = _finite_or_inf(loss_of(self.snapshot)) if self.snapshot is not None else math.inf
        better = [s for s in self.ring if _finite_or_inf(loss_of(s)) < now]
        return min(reversed(better), key=lambda s: _finite_or_inf(loss_of(s))) if better else None

    def rewind(self, state: StepState) -> dict:
        """Back to :meth:`rewind_target`: it becomes the last verified state; later ring snapshots go."""
        target, last = self.rewind_target(), self.snapshot
        target.restore(state.optimizer)
        self.ring = [s for s in self.ring if s.step < target.step]
        self.snapshot, state.restored_step = target, target.step
        self._after_agreement(state, lambda: self.plugins.hook.on_rollback(
            state=state, restored_step=target.step, events=self.events))
        return {"restored_step": target.step, "restored_loss": loss_of(target),
                "from_step": last.step if last is not None else None}

    def _keep_in_ring(self, snapshot: SnapshotLike | None) -> None:
        """The ring keeps the first verified snapshot and one every ``ring_every`` steps; when full it lets go
        of the oldest that is not the one with the lowest loss (a rewind's best target)."""
        if snapshot is None or not self.ring_size:
            return
        if self.ring and snapshot.step - self.ring[-1].step < self.ring_every:
            return
        self.ring.append(snapshot)
        if len(self.ring) > self.ring_size:
            best = min(self.ring, key=lambda s: _finite_or_inf(loss_of(s)))
            self.ring.remove(next(s for s in self.ring if s is not best))

    def _after_agreement(self, state: StepState, call):
        """Hooks called after the ranks agreed: one that raises stops the run at the next agreement."""
        try:
            return call()
        except HookError as exc:
            self.held.append(self.failed(exc, state.step, state.samples))
            return None

    def _roll_back(self, state: StepState) -> None:
        self.rollbacks += 1
        if self.snapshot is None:
            return  # nothing verified yet: the rollback is a skip
        self.snapshot.restore(state.optimizer)
        state.restored_step = self.snapshot.step
        self._after_agreement(state, lambda: self.plugins.hook.on_rollback(
            state=state, restored_step=self.snapshot.step, events=self.events))

    def _stop(self, host: StepHost, state: StepState) -> None:
        """STOP: the last verified state (this step's update is already dropped) becomes a checkpoint."""
        snapshot = self.snapshot
        if snapshot is not None:
            snapshot.restore(state.optimizer)
            state.restored_step = snapshot.step
        guard_state = snapshot.guard_state if snapshot is not None else plugin_states(self.plugins)
        self.stopped = Stopped(state.step, state.verdict, state.restored_step, guard_state)
        checkpoint = host.save_stopped(state.model)  # its guard state is self.state_dict(): the snapshot's
        where = {"where": state.where.values()} if state.where is not None else {}
        self.events.record(state.verdict.by, "stop", f"run stopped at {self.stopped.reason}", step=state.step,
                           checkpoint=checkpoint, verified=snapshot is not None, restored_step=state.restored_step,
                           reason=state.verdict.reason, error=state.verdict.error, **where)
        host.end_training()

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the step: the counters and every plugin's state; after a STOP, the
        state of the snapshot's moment (the checkpoint holds the snapshot's weights)."""
        stopped = self.stopped
        # A resumed run takes its first snapshot at its first accepted step: a checkpoint's weights are not
        # verified until their loss is judged. Kept to compare a resumed run with one never interrupted.
        snapshot_step = self.snapshot.step if self.snapshot is not None else None
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks, "snapshot_step": snapshot_step,
                "consecutive_skips": 0 if stopped else self.consecutive_skips,
                "verified_step": stopped.verified_step if stopped else None,
                "stop_reason": stopped.reason if stopped else None,
                "plugins": stopped.guard_state if stopped else plugin_states(self.plugins),
                "recovery": self.recovery.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.skipped_steps = saved.get("skipped_steps", 0)
        self.consecutive_skips = saved.get("consecutive_skips", 0)
        self.rollbacks = saved.get("rollbacks", 0)
        self.recovery.load_state_dict(saved.get("recovery", {}))
        if self.heal_on_resume:
            self._heal_on_resume(saved.get("stop_reason"))
        load_plugin_states(self.plugins, saved.get("plugins", {}))

    def _heal_on_resume(self, stop_reason: str | None) -> None:
        if stop_reason is None:
            self.events.record("core", "info", "--heal: this checkpoint was not written by a STOP; nothing to heal",
                               console=True)
            return
        self.recovery.pending = f"asked with --heal after the STOP at {stop_reason}"
        self.events.record("core", "info", f"--heal: the next remedy ({self.recovery.next_remedy()}) is applied at "
                           "the first step", console=True)

    # -- events ------------------------------------------------------------------------------------

    def _record(self, state: StepState) -> None:
        verdict, who = state.verdict, state.verdict.by
        where = {"where": state.where.values()} if state.where is not None else {}
        said = f" [where: {state.where.brief()}]" if state.where is not None and state.where.brief() else ""
        if verdict.action == Action.SKIP:
            self.skipped_steps += 1
            self.events.record(who, "skip", f"step {state.step} skipped: {verdict.reason}{said}", step=state.step,
                               skipped_steps=self.skipped_steps, reason=verdict.reason, step_samples=state.samples,
                               **state.host(), **where)
        elif verdict.action == Action.ROLLBACK:
            undone, self.since_snapshot = self.since_snapshot, {}
            if state.restored_step is None:
                message = f"step {state.step} skipped (no verified snapshot yet to roll back to): {verdict.reason}"
            else:
                message = (f"step {state.step}: restored the state after step {state.restored_step}; skipped "
                           f"{len(state.samples)} sample(s) of this step, undid {len(undone)} step(s) "
                           f"({verdict.reason})")
            self.events.record(who, "rollback", message + said, step=state.step, restored_step=state.restored_step,
                               reason=verdict.reason, skipped_samples=state.samples, undone_samples=undone,
                               rollbacks=self.rollbacks, **state.host(), **where)
            self.events.alert(who, f"rolled back to the state after step {state.restored_step} at step {state.step}"
                              if state.restored_step is not None else message, step=state.step)


def agree_across_ranks(verdict: Verdict, asked: bool = False) -> tuple[Verdict, bool]:
    """The most severe verdict of any rank, on every rank, and whether any rank asked where the step broke:
    one all-reduce (a no-op outside distributed runs)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verdict, asked
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    worst = torch.tensor([int(verdict.action), int(asked)], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    action, asked = worst.tolist()
    if action == Action.PROCEED:
        return verdict, bool(asked)
    # Rare path (a skip or a stop somewhere): gather every rank's reason so all ranks log the same one.
    everyone: list[Verdict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, verdict)
    return merge_ranks(everyone), bool(asked)


def first_across_ranks(name: str | None) -> str | None:
    """The first rank's answer that is not None, on every rank (anomalous steps only: one collective)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return name
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, name)
    return next((n for n in everyone if n is not None), None)


def merge_ranks(everyone: list[Verdict]) -> Verdict:
    """The most severe of the ranks' (already combined) verdicts; differing reasons are named by rank."""
    worst = max(v.action for v in everyone)
    top = [(rank, v) for rank, v in enumerate(everyone) if v.action == worst]
    reasons = list(dict.fromkeys(v.reason for _, v in top))
    reason = reasons[0] if len(reasons) == 1 else "; ".join(f"rank {rank}: {v.reason}" for rank, v in top)
    return Verdict(worst, reason, tuple(g for _, v in top for g in v.guard),
                   next((v.error for _, v in top if v.error), ""), all(v.healable for _, v in top))


def plugin_states(plugins) -> dict[str, Any]:
    """``state_dict`` of every plugin that implements it, keyed by plugin name (one call per plugin:
    pluggy would merge the results into one list, losing whose each is)."""
    states = {}
    for impl in seams.hook_impls(plugins.hook.state_dict):
        value = seams.call_impl(impl)
        if value is not None:
            states[impl.plugin_name] = value
    return states


def load_plugin_states(plugins, states: dict[str, Any]) -> None:
    for impl in seams.hook_impls(plugins.hook.load_state_dict):
        if impl.plugin_name in states:
            seams.call_impl(impl, **{arg: states[impl.plugin_name] for arg in impl.argnames})


class Healing:
    """What a remedy may do to the run in the middle of a step: the recovery's handle on the step."""

    def __init__(self, guarded: GuardedStep, state: StepState, engine: Engine):
        self.guarded, self.state, self.engine = guarded, state, engine

    def top_share(self) -> tuple[str | None, float]:
        """The module holding the largest share of this step's grad norm (``where``), and that share."""
        where = self.state.where
        if where is None or where.nonfinite:
            return None, 0.0
        shares: dict[str, float] = {}
        for module, _, share in where.modules:
            shares[module] = shares.get(module, 0.0) + share
        top = max(shares, key=shares.get, default=None)
        return top, shares.get(top, 0.0)

    def can_rewind(self) -> bool:
        return self.guarded.rewind_target() is not None

    def rewind(self) -> dict:
        return self.guarded.rewind(self.state)

    @torch.no_grad()
    def reset_moments(self) -> dict:
        """SPAM's reset: the optimizer state of the top module's tensors zeroed (their step counts kept)."""
        module, _ = self.top_share()
        names = [n for n in (self.state.where.tensors if self.state.where else {}) if module_of(n)[0] == module]
        params = dict(self.state.model.named_parameters())
        reset = [n for n in names if n in params and params[n] in self.state.optimizer.state]
        for name in reset:
            for key, value in self.state.optimizer.state[params[name]].items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    value.zero_()
        return {"module": module, "tensors": reset}


def loss_of(snapshot: SnapshotLike | None) -> float | None:
    """The loss a snapshot's weights were accepted with, the mean over the ranks (read once, then kept as a
    float). Every rank reads the same snapshots in the same order (the ring follows agreed verdicts), so
    the one collective of the first read lines up; ranks then keep, evict and rewind to the same ones."""
    value = getattr(snapshot, "loss", None)
    if torch.is_tensor(value):
        value = snapshot.loss = _mean_across_ranks(value)
    return value


def _mean_across_ranks(value: torch.Tensor) -> float:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = value.detach().float().reshape(1).to(device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _finite_or_inf(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def evidence_across_ranks(evidence: Evidence) -> Evidence:
    """Every rank's replayed losses and mismatches, merged, on every rank (rejected steps only)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return evidence
    everyone: list[Evidence | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, evidence)
    return evidence.merge([e for e in everyone if e is not None])
