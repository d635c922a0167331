"""GuardTrainer: the Hugging Face Trainer, with stabguard's guarded step at its optimizer-step seam.

The step itself (measure -> decide -> agree -> apply -> notify) reads top to bottom in
:mod:`stabguard.step`; every private transformers/accelerate name it relies on sits in
:mod:`stabguard.seams`. This class only connects them to the Trainer: the micro-batches' losses,
samples and data verdicts go in, checkpoints carry the guard state, and a STOP writes the last verified
state and ends the loop. Every check lives in a plugin.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass

import torch
import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from stabguard import metrics, seams
from stabguard.checkpoints import (
    GUARD_STATE_FILE,
    MANIFEST_FILE,
    SaveError,
    choose_resume,
    expired,
    mark_guard_state,
    newest_committed,
    stamps,
    write_manifest,
    written_since,
)
from stabguard.engine import GradientArrival, TorchEngine, gathered_trainable
from stabguard.recipe_schema import RecoverySection, SnapshotSection
from stabguard.recovery import UNNAMED
from stabguard.replay import capture_rng, select_rows
from stabguard.step import GuardedStep, StepState
from stabguard.verdict import Action, GuardError, HookError, Verdict, combine

COLLATED_KEY, VERDICT_KEY = "stabguard_collated", "stabguard_verdict"  # ride with each collated batch

__all__ = ["GUARD_STATE_FILE", "GuardTrainer", "GuardedTrainer", "StepState", "guarded"]


class _GuardedCollator:
    """Wraps the data collator with ``pre_collate``; ``post_collate`` fires later, in the main process.

    This runs wherever the data loader collates: in the main process, or in a loader worker when
    ``dataloader_num_workers > 0``. The batch carries a :class:`Collated` (its samples, without decoded
    images, and its CPU tensors) and ``pre_collate``'s combined verdict (a hook that raised becomes a STOP
    naming it). The trainer takes both off before the batch reaches the model, fires ``post_collate`` on
    the CPU tensors in the main process, and holds the verdicts for the optimizer step that trains on the
    batch, where they are agreed across ranks like ``pre_step``'s.
    """

    def __init__(self, collator, plugins, events, failed):
        self.collator, self.plugins, self.events, self.failed = collator, plugins, events, failed

    def __call__(self, samples):
        samples = list(samples)
        try:
            verdicts = self.plugins.hook.pre_collate(samples=samples, events=self.events)
        except HookError as exc:
            verdicts = [self.failed(exc, None, sample_ids(samples))]
        batch = self.collator(samples)
        # The collator may drop samples (truncation policy); the guards must see the rows of the batch.
        samples = getattr(self.collator, "last_samples", samples)
        batch[COLLATED_KEY] = Collated([_without_images(s) for s in samples], dict(batch))
        batch[VERDICT_KEY] = combine(verdicts) if verdicts else None
        return batch

    def __getattr__(self, name):  # the Trainer inspects collator attributes
        if name.startswith("__") or name == "collator":  # unpickling looks these up before __init__ ran
            raise AttributeError(name)
        return getattr(self.collator, name)


@dataclass
class Collated:
    """What ``post_collate`` gets in the main process: the batch's samples and its tensors on the CPU.

    A plain object, so the data loader's move to the device leaves it (and the CPU tensors in it) alone;
    from a worker it arrives through the loader's shared memory like the batch itself.
    """

    samples: list[dict]
    cpu_batch: dict


def _without_images(sample: dict) -> dict:
    """Decoded images are not sent back from loader workers; their pixels are in the batch."""
    return {k: v for k, v in sample.items() if k != "images"} | {"n_images": len(sample.get("images") or [])}


def sample_ids(samples: list[dict]) -> list[str]:
    """Each sample's ``id``; rows a framework built without one are named by their place in the batch."""
    return [str(s["id"]) if s.get("id") is not None else f"{UNNAMED}{i}" for i, s in enumerate(samples)]


def _to_device(cpu: dict, inputs: dict, key: str) -> None:
    """A tensor changed on the CPU replaces the device batch's copy (on a CPU run they are one tensor)."""
    if torch.is_tensor(cpu.get(key)) and torch.is_tensor(inputs.get(key)) and cpu[key] is not inputs[key]:
        inputs[key] = cpu[key].to(inputs[key].device, inputs[key].dtype)


class _HookCallback(TrainerCallback):
    """Fires the hooks that sit on the Trainer's callback events."""

    def __init__(self, trainer: GuardTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # Readers cut a resumed run's log history here: the lines before belong to earlier runs.
        self.trainer.events.record("core", "info", f"training starts after step {state.global_step}",
                                   step=state.global_step, start_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.last_step is not None:
            t.call_after_step(t.plugins.hook.on_step_end, state=t.last_step)
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
        if quarantined := t.guarded.recovery.quarantined:
            t.events.record("core", "info", f"{len(quarantined)} sample(s) quarantined in this run: "
                            f"{', '.join(quarantined)}", step=state.global_step, quarantined=quarantined,
                            console=True)
        t.call_after_step(t.plugins.hook.on_train_end, state=t.last_step, reason=t.stop_reason)
        if t.events.echo is not None:
            t.events.echo.flush()  # the "N more like the above" line of a repeated decision


# What guarded(...) enables when given no plugins.
PYTHON_GUARDS = ("mask", "grad_norm", "nonfinite", "spike", "divergence")


class GuardedTrainer:
    """The guarded step for any ``transformers.Trainer`` subclass; use :func:`guarded` to apply it.

    :param plugins: a :class:`~stabguard.manager.Plugins` with the run's guards enabled; None: the
        built-in guards named in ``guards`` (default: mask, grad_norm, nonfinite, spike, divergence), with
        ``setup_model`` fired on the trainer's model and processing class.
    :param events: the run's :class:`~stabguard.events.EventLog`; None: ``<output_dir>/events.jsonl``.
    :param guards: ``{name: {option: value}}`` for the guards to enable when ``plugins`` is None.
    :param plugin_modules: plugin modules to load beside the built-ins when ``plugins`` is None.
    :param setup_guards: fire ``setup_model`` here also when ``plugins`` is given (as ``stabguard run``
        does it itself after loading the model).
    :param max_consecutive_skips: dropped steps in a row (any guard) before the core stops the run.
    :param snapshot_every: optimizer steps between verified snapshots (0: none; a STOP then saves the
        current, unverified state).
    :param snapshot_offload: keep the snapshot in CPU memory.
    :param snapshot_ring: earlier verified snapshots kept for a rewind (``[snapshots] ring``).
    :param snapshot_ring_every: optimizer steps between them (``[snapshots] ring_every``).
    :param recovery: the recovery policy (:class:`~stabguard.recovery.RecoverySection` or its dict, as
        ``[recovery]`` in a recipe); None: the defaults (on, budget 3 remedies per 500 steps).
    """

    def __init__(self, *args, plugins=None, events=None, guards: dict | None = None, plugin_modules=(),
                 setup_guards: bool = False, max_consecutive_skips: int = 20, snapshot_every: int = 1,
                 snapshot_offload: bool = False, recovery: RecoverySection | dict | None = None,
                 snapshot_ring: int = 2, snapshot_ring_every: int = 20, **kwargs):
        super().__init__(*args, **kwargs)
        setup_guards = setup_guards or plugins is None
        if plugins is None:
            plugins = plugins_for(guards, modules=plugin_modules)
        own_events = events is None
        if own_events:  # as stabguard run makes it: decisions on the console, alerts to on_alert
            from stabguard.console import quiet_log_dicts, run_event_log

            events = run_event_log(seams.output_dir(self) / "events.jsonl", plugins, rank=self.args.process_index)
            quiet_log_dicts(self)
        self.plugins, self.events = plugins, events
        if isinstance(recovery, dict):
            recovery = RecoverySection(**recovery)
        self.guarded = GuardedStep(plugins, events, max_consecutive_skips=max_consecutive_skips,
                                   snapshot_every=snapshot_every, snapshot_offload=snapshot_offload,
                                   recovery=recovery,
                                   snapshots=SnapshotSection(ring=snapshot_ring, ring_every=snapshot_ring_every))
        self.last_step: StepState | None = None
        self.resume_verified: str | None = None  # a checkpoint stabguard run has verified already
        self._all_quarantined = False  # every row of the micro-batch being trained is quarantined
        self._images: list[int] = []  # the images of each row of the micro-batch being trained
        self._window_steps = self._window_dropped = 0  # optimizer steps since the last log line
        self._loss_at_step_start: torch.Tensor | None = None
        self._torch_engine = TorchEngine()  # single device, DDP, FSDP2; DeepSpeed: a ZeroEngine at the first step
        self._host = _TrainerHost(self)
        # Wrapped after the Trainer's own __init__: subclasses (TRL's SFTTrainer) build their collator there.
        if self.data_collator is not None and not isinstance(self.data_collator, _GuardedCollator):
            self.data_collator = _GuardedCollator(self.data_collator, plugins, events, self.guarded.failed)
        if self.is_fsdp_enabled and seams.fsdp_version(self.accelerator) != 2:
            from stabguard.engine_check import FSDP1_REFUSED

            raise GuardError(f"GuardTrainer: {FSDP1_REFUSED}")
        if self.is_fsdp_enabled and (problem := seams.fsdp2_accelerate_problem()):
            raise GuardError(problem)
        # Replaced by the nonfinite guard; the Trainer's version syncs every micro-step and only hides NaN.
        self.args.logging_nan_inf_filter = False
        self.add_callback(_HookCallback(self))
        if setup_guards:
            plugins.hook.setup_model(model=self.model, processor=self.processor_for_guards(), recipe=None,
                                     events=events)

    def processor_for_guards(self):
        """The processor the guards read the model's inputs with (the mask guard decodes labels with it):
        ``processing_class``, unless a framework keeps its processor elsewhere (see stabguard.integrations)."""
        return self.processing_class

    @property
    def stop_reason(self) -> str | None:
        """``"step N: <reason>"`` once a STOP ended the run, else None."""
        return self.guarded.stopped.reason if self.guarded.stopped else None

    @property
    def stop_verdict(self) -> Verdict | None:
        return self.guarded.stopped.verdict if self.guarded.stopped else None

    @property
    def skipped_steps(self) -> int:
        """Steps a SKIP verdict dropped (rolled-back steps are counted in ``guarded.rollbacks``)."""
        return self.guarded.skipped_steps

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

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.guarded.dropped_this_run = 0
        if resume_from_checkpoint and resume_from_checkpoint != self.resume_verified:
            resume_from_checkpoint = self._verified_resume(resume_from_checkpoint)
        if not self.guarded.reach_checked:  # the first step names trainable tensors no gradient reached
            self.guarded.arrival = GradientArrival(self.model)
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.guarded.arrival is not None:  # no step ran
                self.guarded.arrival.remove()
                self.guarded.arrival = None
        return TrainOutput(out.global_step, out.metrics.get("train_loss", out.training_loss), out.metrics)

    def _verified_resume(self, resume) -> str:
        """The checkpoint to resume from, verified against its manifest, however the resume was asked for (a
        framework's ``resume_from_checkpoint``, ``stabguard run --resume``): True is the newest that verifies
        (the Trainer's own pick is the highest number, complete or not); a folder must verify, else
        :class:`~stabguard.checkpoints.ResumeError` names what is wrong and the newest good one."""
        chosen, notes = choose_resume(seams.output_dir(self), "last" if resume is True else str(resume),
                                      option="resume_from_checkpoint")
        for note in notes:
            self.events.record("core", "info", f"resume: {note}", console=True)
            if self.events.echo is None and self.is_world_process_zero():  # a framework's run: no console echo
                print(f"stabguard: resume: {note}", flush=True)
        return str(chosen)

    def training_step(self, model, inputs, num_items_in_batch=None):
        samples, verdict = self._data_verdict(inputs)
        if not self.guarded.micro and seams.loss_sum(self) is not None:
            self._loss_at_step_start = seams.loss_sum(self).detach().clone()
        self.guarded.add_micro_batch(samples, verdict, quarantined=self._all_quarantined, inputs=inputs,
                                     images=self._images)  # kept until the step decides: a replay reads them
        if self.is_deepspeed_enabled:  # the step runs inside backward: the engine wrapper adds the loss
            self._guard_deepspeed_engine()
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guarded.add_loss(loss)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A training forward records the model's own loss and the RNG state it started from (a replay of a
        rejected step reproduces it). Every row of this micro-batch quarantined: the forward and backward
        of the one row left still run (each rank's collectives match), with a loss of exactly 0 and no
        gradient, instead of the model's 0/0 NaN."""
        if not self._all_quarantined:
            training = model.training
            rng = capture_rng() if training else None
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if training:
                own = getattr(outputs, "loss", None) if not isinstance(outputs, dict) else outputs.get("loss")
                extra = {"num_items_in_batch": num_items_in_batch} if (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None) else {}
                self.guarded.add_forward(own.detach() if torch.is_tensor(own) else None, rng, extra)
            return (loss, outputs) if return_outputs else loss
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = outputs.logits.float().sum() * 0.0
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        _, verdict = self._data_verdict(inputs, training=False)
        if verdict is not None and verdict.action == Action.STOP:  # evaluation data: the next step stops
            self.guarded.held.append(verdict)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _data_verdict(self, inputs, training: bool = True) -> tuple[list[str], Verdict | None]:
        """``post_collate`` in the main process, on the batch's CPU tensors, before the model sees it.

        Returns the batch's sample ids (those it trains on) and the data hooks' combined verdict. Labels a
        guard changed on the CPU (a sample skipped) are copied to the device batch; unchanged ones cost
        nothing. In training, quarantined samples' rows then leave the device batch (after the guards saw
        them): no forward, no loss, nothing beside them touched; the order of the others is kept.
        """
        verdicts = [v for v in [inputs.pop(VERDICT_KEY, None)] if v is not None]
        collated = inputs.pop(COLLATED_KEY, None)
        self._all_quarantined, self._images = False, []
        if collated is None:  # a collator of the user's own, not wrapped by stabguard
            return [], combine(verdicts) if verdicts else None
        ids, cpu, labels = sample_ids(collated.samples), collated.cpu_batch, collated.cpu_batch.get("labels")
        before = labels.clone() if torch.is_tensor(labels) else None
        try:
            verdicts += self.plugins.hook.post_collate(batch=cpu, samples=collated.samples, events=self.events)
        except HookError as exc:
            verdicts.append(self.guarded.failed(exc, None, ids))
        if before is not None and not torch.equal(before, cpu["labels"]):
            _to_device(cpu, inputs, "labels")
        self._images = [int(s.get("n_images", 0)) for s in collated.samples]
        if training and (rows := self.guarded.recovery.drop_rows(ids)):
            ids = self._remove_rows(inputs, ids, rows)
        return ids, combine(verdicts) if verdicts else None

    def _remove_rows(self, inputs, ids: list[str], rows: list[int]) -> list[str]:
        """Quarantined rows out of the device batch, in place; the ids of the rows left. A micro-batch left
        empty keeps its first row, masked, for the forward every rank runs (its loss is 0, see compute_loss)."""
        dropped = [ids[i] for i in rows]
        keep = [i for i in range(len(ids)) if i not in rows]
        self._all_quarantined = not keep
        self.events.record("core", "info", f"quarantined sample(s) removed from this batch: {', '.join(dropped)}",
                           step=self.state.global_step + 1, removed=dropped)
        smaller = select_rows(dict(inputs), keep or [0], self._images)
        inputs.clear()
        inputs.update(smaller)
        self._images = [self._images[i] for i in keep or [0]]
        return [ids[i] for i in keep]

    def _clip_grad_norm(self, model):
        """Called by the Trainer once per optimizer step, before ``optimizer.step()``."""
        if not self.is_deepspeed_enabled:  # DeepSpeed: the step already ran inside backward
            self.last_step = self.guarded.run(self._host, model, self._torch_engine)
        step = self.last_step
        self._window_steps += 1
        if step.verdict.action != Action.PROCEED:
            self._window_dropped += 1
            self.take_back_step_loss()  # after the Trainer added the step's last micro-batch loss
        return step.grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        # Reached without _clip_grad_norm when max_grad_norm == 0: still exactly one guarded pass.
        return self._clip_grad_norm(model) if grad_norm is None else grad_norm

    def _guard_deepspeed_engine(self) -> None:
        """Put the guarded step between DeepSpeed's backward and its step (once the engine exists)."""
        from stabguard.zero import GuardedEngineWrapper

        wrapped = seams.deepspeed_engine_wrapper(self.accelerator)
        if isinstance(wrapped, GuardedEngineWrapper):
            return
        seams.set_deepspeed_engine_wrapper(self.accelerator,
                                           GuardedEngineWrapper(wrapped, self.guarded, self._run_zero_step))

    def _run_zero_step(self, engine, zero) -> None:
        self.last_step = self.guarded.run(self._host, engine, zero)

    def take_back_step_loss(self) -> None:
        """A dropped step's loss leaves the Trainer's running sum (a NaN would poison every later log)."""
        if self._loss_at_step_start is not None:
            seams.loss_sum(self).copy_(self._loss_at_step_start)

    def call_after_step(self, hook, **kwargs) -> None:
        """Hooks after the agreement (``on_step_end``, ``on_log``, ``on_train_end``): one that raises
        stops the run at the next step's agreement (the runner reports one left after the last step)."""
        try:
            hook(events=self.events, **kwargs)
        except HookError as exc:
            step = self.last_step.step if self.last_step else None
            self.guarded.held.append(self.guarded.failed(exc, step, []))

    def save_stopped(self, model) -> str | None:
        """A STOP's checkpoint (the step restored the last verified state); a regular checkpoint of the
        rejected state, written at this step, is kept beside it as ``unverified-checkpoint-N``."""
        if self.state.global_step == 0:
            return None  # no step ran: nothing worth keeping
        folder = self._set_aside_unverified()
        self._save_checkpoint(model, trial=None)
        return str(folder)

    def _set_aside_unverified(self):
        """A regular checkpoint of this step holds the state that led to the stop: keep it, renamed."""
        folder = seams.output_dir(self) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            os.replace(folder, folder.with_name(f"unverified-{folder.name}"))
        return folder

    # -- logs and checkpoints ----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "grad_norm" in logs:  # training log lines, not the final summary
            self._average_over_kept_steps(logs)
            logs[metrics.SKIPPED_STEPS] = self.guarded.skipped_steps  # SKIP verdicts
            logs[metrics.ROLLBACKS] = self.guarded.rollbacks  # ROLLBACK verdicts: the other dropped steps
            self.call_after_step(self.plugins.hook.on_log, logs=logs, state=self.last_step)
            # trainer_state.json is only rewritten at checkpoints; this line lets a monitor follow live.
            self.events.record("core", "log", "", step=self.state.global_step, **logs)
        if "train_loss" in logs:
            self._average_train_loss(logs)
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

    def _average_train_loss(self, logs: dict) -> None:
        """The final ``train_loss``: the Trainer divides by every step of this run, dropped ones too."""
        steps = seams.train_loss_steps(self)
        trained = steps - self.guarded.dropped_this_run
        if self.guarded.dropped_this_run and trained > 0:
            logs["train_loss"] = logs["train_loss"] * steps / trained

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The Trainer's save. After a sharded FSDP2 run, whose final save writes no weights, the adapter is
        gathered from every rank's shards and written whole to ``output_dir``, as on every other engine. A
        final save (not a checkpoint's) is committed with a manifest of the files it wrote."""
        folder = output_dir or self.args.output_dir
        before = stamps(folder) if self.args.should_save and not _internal_call and os.path.isdir(folder) else {}
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            return  # a checkpoint's weights: its manifest comes with the rest of it
        if self.is_fsdp_enabled and not seams.fsdp_full_state_dict(self.accelerator):
            self._save_gathered_adapter(folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_manifest(folder, written_since(folder, before))

    def _save_gathered_adapter(self, output_dir: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "peft_config"):
            return  # full fine-tuning under FSDP2: the sharded checkpoints hold the weights
        weights = gathered_trainable(model)  # every rank takes part
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict=weights)

    def _save_checkpoint(self, model, trial):
        """Every checkpoint is a commit: the Trainer's files and every rank's shards, the guard state, then the
        manifest (rank 0, after a barrier). Rotation (``save_total_limit``) waits for the commit; a save that
        fails removes its incomplete folder and leaves every earlier checkpoint as it was."""
        folder = seams.output_dir(self) / f"checkpoint-{self.state.global_step}"
        try:
            self._write_checkpoint(model, trial, folder)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            raise self._save_failed(folder, exc) from exc

    def _write_checkpoint(self, model, trial, folder) -> None:
        if self.args.should_save and (folder / MANIFEST_FILE).exists():  # a resumed run saves this step again:
            (folder / MANIFEST_FILE).unlink()  # uncommitted until its new files are all written
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # no rotation before the commit
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            guard_state = mark_guard_state({"run": self.events.run, **self.guarded.state_dict()})
            tmp = folder / f".{GUARD_STATE_FILE}.tmp"  # atomic: a reader never sees half of it
            tmp.write_text(json.dumps(guard_state, indent=1))
            os.replace(tmp, folder / GUARD_STATE_FILE)
        self.accelerator.wait_for_everyone()  # every rank's shards are written before the commit lists them
        if self.args.should_save:
            self._commit(folder)

    def _commit(self, folder) -> None:
        """The manifest, then ``save_total_limit``'s deletions. The commit waits for the disk (fsync) only
        when a checkpoint is deleted next: then this one must survive a power cut on its own."""
        old = expired(folder.parent, self.args.save_total_limit, keep=(folder, self.state.best_model_checkpoint))
        write_manifest(folder, durable=bool(old))
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def _save_failed(self, folder, exc: Exception) -> SaveError:
        """Removes what the failed save wrote (a full disk needs the room) and says what failed (the runner
        logs it with the run's other events)."""
        if self.args.should_save and not (folder / MANIFEST_FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)
        before = newest_committed(folder.parent)
        kept = f"the newest committed one is {before.name}" if before else "no earlier checkpoint was committed"
        return SaveError(f"{folder.name}: the save failed ({exc}); its incomplete folder was removed, {kept}")

    def _load_optimizer_and_scheduler(self, checkpoint):
        # On resume, every engine (DeepSpeed too) comes here after loading the weights.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, GUARD_STATE_FILE)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    saved = json.load(f)
            except json.JSONDecodeError as exc:
                raise GuardError(f"{path}: unreadable guard state ({exc}); delete it to resume without it") from None
            self.guarded.load_state_dict(saved)
            self.events.record("core", "info", f"guard state restored from {path}",
                               resumed_from=str(checkpoint), previous_run=saved.get("run"))


class _TrainerHost:
    """The Trainer as the guarded step's :class:`~stabguard.step.StepHost`."""

    def __init__(self, trainer: GuardedTrainer):
        self.trainer = trainer

    @property
    def optimizer(self):
        return self.trainer.optimizer

    def next_step(self) -> int:
        return self.trainer.state.global_step + 1

    def max_grad_norm(self) -> float | None:
        return self.trainer.args.max_grad_norm or None

    def unscale_gradients(self) -> None:
        self.trainer.accelerator.unscale_gradients()

    def save_stopped(self, model) -> str | None:
        return self.trainer.save_stopped(model)

    def end_training(self) -> None:
        self.trainer.control.should_training_stop = True

    def replay_model(self, model):
        return self.trainer.accelerator.unwrap_model(model)

    def lr(self) -> float:
        return self.trainer.optimizer.param_groups[0]["lr"]

    def peak_lr(self) -> float:
        scheduler = self.trainer.lr_scheduler
        return scheduler.base_lrs[0] if getattr(scheduler, "base_lrs", None) else self.lr()

    def scale_lr(self, factor: float) -> tuple[float, float]:
        """The scheduler computes each step's rate from ``base_lrs``: scaling them keeps its shape."""
        groups, scheduler = self.trainer.optimizer.param_groups, self.trainer.lr_scheduler
        before = groups[0]["lr"]
        for group in groups:
            group["lr"] *= factor
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        return before, groups[0]["lr"]


def plugins_for(guards: dict | None, modules=(), where: str = ""):
    """The guards named in ``guards`` (default: PYTHON_GUARDS), from the built-ins and the plugin
    ``modules``, options validated by name; errors name their key (under ``where``, e.g. "stabguard")."""
    from stabguard.manager import Plugins
    from stabguard.recipe import check_guards

    prefix = f"{where}." if where else ""
    guards = {name: {} for name in PYTHON_GUARDS} if guards is None else guards
    try:
        plugins = Plugins.for_recipe(list(modules), autoload=False)
    except ImportError as exc:
        raise ValueError(f"{prefix}plugins: {exc}") from None
    options, errors = check_guards(guards, plugins.guard_options(), off_unless_named=set(plugins.guards))
    if errors:
        raise ValueError("; ".join(f"{prefix}{key}: {message}" for key, message in errors))
    plugins.enable_guards(options)
    return plugins


@functools.cache
def guarded(trainer_class: type) -> type:
    """``trainer_class`` with stabguard's guarded step: ``guarded(SFTTrainer)(..., guards={...})``."""
    return type(f"Guarded{trainer_class.__name__}", (GuardedTrainer, trainer_class), {"__module__": __name__})


GuardTrainer = guarded(transformers.Trainer)
