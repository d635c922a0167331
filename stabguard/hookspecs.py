"""Every hook stabguard fires, grouped by when it fires.

Implementations take any subset of a hook's parameters, by name; hooks are always called with keyword
arguments, so new parameters can be added without breaking existing plugins. Every hook also receives
``events`` (the run's ``EventLog``) for recording decisions and alerts.

When each fires, inside one optimizer step (stabguard/step.py reads the same way):

    register_guards(register) -> configure(recipe) -> setup_model(model, ...) -> make_optimizer(...)   once
    pre_collate(samples) -> collator        per micro-batch, where the loader collates (a worker or the
                                            main process)
    post_collate(batch, samples)            per micro-batch, in the main process, before the model sees it;
                                            the data hooks' verdicts are held for the step that trains on it
    forward/backward x gradient accumulation
    post_backward(state)     one shared pass over the gradients has filled state.grad_norm and state.loss
    pre_step(state)          -> Verdict | None, with the held data verdicts:
                             STOP > ROLLBACK > SKIP > PROCEED, agreed across ranks, then applied
       PROCEED:  snapshot when due (the weights this loss came from), clip once, optimizer and scheduler step
       SKIP:     gradients dropped, no optimizer step, no scheduler step, counted, logged
       ROLLBACK: a SKIP that restores the last verified snapshot; then on_rollback(state, restored_step)
       STOP:     the last verified snapshot saved as a checkpoint, the run ends with the reason
       (a healable STOP with recovery budget left: propose_remedies(state, recovery), then a ROLLBACK
       and one remedy)
    on_step_end(state)
    on_log(logs, state)      on logging steps: add stabguard/<name> metrics to logs
    state_dict() at each checkpoint; load_state_dict(state) on resume; on_alert(alert) per alert
    on_train_end(state, reason)                                                                       once

``stabguard check`` fires ``register_guards``, ``configure``, ``setup_model``, ``make_optimizer``,
``preflight``, ``pre_collate`` and ``post_collate`` (on a sample batch), never the step hooks.

A hook that raises does not crash one rank: the core records an ``error`` event naming the hook, the
plugin, the rank and the samples, and turns it into a STOP that every rank agrees on at the next
decision (``stabguard run`` exits 4; 1 when the exception is a ``stabguard.GuardError``). An
``on_alert`` implementation that raises is recorded as an ``error`` event and training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from stabguard import hookimpl  # noqa: F401 - re-exported: plugins may import it from here

if TYPE_CHECKING:  # annotations only: importing this module stays cheap
    import torch
    from transformers import TrainingArguments

    from stabguard.events import Alert, EventLog
    from stabguard.recipe_schema import Recipe
    from stabguard.recovery import Recovery, Remedy
    from stabguard.step import StepState
    from stabguard.verdict import Verdict

hookspec = pluggy.HookspecMarker("stabguard")


# ---------------------------------------------------------------------------------------------
# Discovery and set-up (once per run, before any model is loaded)
# ---------------------------------------------------------------------------------------------


@hookspec
def register_guards(register: Callable[..., None]) -> None:
    """Declare the guards this plugin provides.

    Fires once when the plugin manager is built, before the recipe's ``[guards.*]`` tables are checked.

    :param register: call ``register(name, options, factory)``: ``name`` is the recipe table name
        (``[guards.<name>]``), ``options`` a pydantic model class of the guard's options (unknown keys
        are rejected), ``factory(options) -> object`` builds the guard object whose ``@hookimpl``
        methods are registered while the guard is enabled.
    :return: ignored; every implementation is called.
    """


@hookspec
def configure(recipe: Recipe, events: EventLog) -> None:
    """The recipe is validated and the enabled guards are registered; nothing is loaded yet.

    :param recipe: the validated ``Recipe``.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


@hookspec
def setup_model(model: torch.nn.Module, processor: Any, recipe: Recipe | None, events: EventLog) -> None:
    """The model is loaded and PEFT-wrapped, before the Trainer is built.

    Freezing, audits and parameter tables belong here. Raise ``stabguard.GuardError`` to refuse
    to train (the message is shown to the user and the run exits non-zero before any step).

    :param model: the (possibly PEFT-wrapped) model; may be changed in place.
    :param processor: the model's processor (tokenizer + image processor).
    :param recipe: the validated recipe.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


@hookspec(firstresult=True)
def make_optimizer(model: torch.nn.Module, args: TrainingArguments, param_groups: list[dict],
                   events: EventLog) -> torch.optim.Optimizer | None:
    """Build the optimizer instead of the Trainer's default.

    Fires once, when the Trainer creates its optimizer.

    :param model: the model being trained.
    :param args: the ``transformers.TrainingArguments`` (learning rate, betas, epsilon).
    :param param_groups: the Trainer's parameter groups: trainable parameters only, split into
        weight-decay (``args.weight_decay``) and no-decay (biases, norms) groups.
    :param events: the run's event log.
    :return: a ``torch.optim.Optimizer`` or None. Stops at the first non-None result; when every
        implementation returns None the Trainer builds its default optimizer.
    """


@hookspec
def preflight(recipe: Recipe, model: torch.nn.Module, processor: Any, optimizer: torch.optim.Optimizer | None,
              report: Callable[..., None], events: EventLog) -> None:
    """``stabguard check`` asks each guard what it can tell before any training.

    Fires once per check, after ``configure`` and ``setup_model`` ran on a skeleton of the model (LoRA
    applied, weights on the ``meta`` device: shapes and names, no values) and after ``make_optimizer``.
    Never fires during ``stabguard run``. The built-in ``vision_freeze`` reports the parameter table and
    audits the optimizer here:

        @hookimpl
        def preflight(self, model, optimizer, report):
            frozen = sum(not p.requires_grad for p in model.parameters())
            report("info", f"{frozen} frozen parameter tensors", frozen=frozen)

    :param recipe: the validated recipe.
    :param model: the model skeleton, as ``setup_model`` left it.
    :param processor: the model's processor, or None when the model is not a local folder.
    :param optimizer: what ``make_optimizer`` returned, or None (the Trainer's AdamW over the trainable
        parameters).
    :param report: call ``report(level, message, *, check=None, details=(), **values)`` for each
        finding: ``level`` is "ok", "info", "warn" or "error" (an error fails the check, exit 1);
        ``check`` the heading it is shown under (default: the guard's name); ``details`` lines shown
        under it; ``values`` JSON-serialisable numbers and names, kept in ``stabguard check --json``.
    :param events: an in-memory event log (alerts recorded here are shown as warnings).
    :return: ignored; every implementation is called. An exception is reported as an error finding of
        this plugin and the other checks still run.
    """


@hookspec
def probe(recipe: Recipe, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
          report: Callable[..., None], events: EventLog) -> None:
    """``stabguard check --probe`` asks each guard what one real forward and backward showed.

    The probe is the run's first optimizer step, built exactly as ``stabguard run`` builds it (model,
    engine, guards), with its update vetoed. This fires once, on every rank, when that step's gradients
    are complete and before they are dropped: single device and DDP keep each trainable parameter's
    gradient in ``p.grad``; FSDP2 its local shard (a DTensor); DeepSpeed ZeRO in its own partitions
    (``p.grad`` is None: read one with ``deepspeed.utils.safe_get_full_grad``, a collective). Findings that
    differ between ranks are shown with their ranks. Never fires during ``stabguard run``. The built-in
    ``vision_freeze`` checks here that no gradient reached the frozen tower:

        @hookimpl
        def probe(self, model, report):
            leaks = [n for n, p in model.named_parameters() if ".visual." in n and p.grad is not None]
            report("error" if leaks else "ok", f"{len(leaks)} vision tensors got a gradient",
                   check="probe: gradients")

    ``stabguard.testing.run_probe(recipe_path, *test_plugins, under_test=my_guard)`` runs the probe with
    your guard and returns the check's report; a test plugin's ``setup_model`` that breaks the model makes
    the fault.

    :param recipe: the validated recipe.
    :param model: the model as the run trains it (PEFT-wrapped, on its device; not the DDP or DeepSpeed
        wrapper), gradients filled.
    :param batches: this rank's probed micro-batches as the model received them (keyword arguments, on
        the model's device).
    :param report: as in ``preflight``: ``report(level, message, *, check=None, details=(), **values)``.
    :param events: an in-memory event log (alerts recorded here are shown as warnings).
    :return: ignored; every implementation is called. An exception is reported as an error finding of
        this plugin and the other checks still run.
    """


# ---------------------------------------------------------------------------------------------
# Data (per micro-batch: pre_collate where the loader collates, post_collate in the main process)
# ---------------------------------------------------------------------------------------------


@hookspec
def pre_collate(samples: list[dict], events: EventLog) -> Verdict | None:
    """A micro-batch of sample dicts is about to be collated.

    It runs where the data loader collates: with ``dataloader_num_workers > 0``, in a worker process, on a
    copy of your guard; keep it stateless (your events and verdicts still arrive).

    :param samples: list of sample dicts (``id``, ``messages``, ``images``). Implementations may edit
        the list in place (drop or repair samples); the collator sees what is left.
    :param events: the run's event log.
    :return: a ``Verdict`` or None. Verdicts are held with the batch and combined
        into the decision of the optimizer step that trains on it (agreed across ranks): SKIP drops
        that step, STOP ends the run. The micro-batch still runs forward/backward, so every rank
        stays in step.
    """


@hookspec
def post_collate(batch: dict[str, torch.Tensor], samples: list[dict], events: EventLog) -> Verdict | None:
    """A micro-batch has been collated into tensors and is about to reach the model (main process, CPU
    tensors, whether or not loader workers collated it).

    :param batch: dict of tensors (``input_ids``, ``attention_mask``, ``labels``, vision inputs);
        may be edited in place (for example labels of a bad sample set to -100).
    :param samples: the sample dicts the batch was built from, in batch order (``id``, ``messages``,
        ``n_images``; decoded images are not sent back from loader workers).
    :param events: the run's event log.
    :return: a ``Verdict`` or None, held and combined as for ``pre_collate``.
        Raising ``stabguard.GuardError`` also ends the run (on every rank), with the message.
    """


# ---------------------------------------------------------------------------------------------
# The optimizer step
# ---------------------------------------------------------------------------------------------


@hookspec
def post_backward(state: StepState, events: EventLog) -> None:
    """Gradients of one optimizer step are accumulated (and reduced across ranks).

    ``state.grad_norm`` (pre-clip global L2 norm) and ``state.loss`` (the sum of the micro-batch losses
    as the Trainer scaled them for accumulation: their mean, the step's loss as logged) are device
    tensors computed in one pass; read them instead of touching the gradients again. Use
    ``state.host()`` for Python floats (one shared host sync per step).

    :param state: the ``StepState`` of this optimizer step.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


@hookspec
def pre_step(state: StepState, events: EventLog) -> Verdict | None:
    """Decide whether this optimizer step may run.

    Fires after ``post_backward``, before clipping and ``optimizer.step()``. A guard that wants the
    gradients clipped calls ``state.clip_to(max_norm)`` (the smallest request wins; clipping uses the
    shared norm). ``state`` holds ``step`` (1-based, the step being decided), ``grad_norm`` and ``loss``
    (device tensors; ``host()`` for floats), ``samples`` (ids of the step's samples), ``model``,
    ``optimizer``, ``max_norm``, ``loss_scaled`` (fp16 AMP), and after the agreement ``verdict``,
    ``restored_step`` and (anomalous steps) ``where``; ``state.ask_where()`` asks the core to work out
    ``where`` for this step too.

    :param state: the ``StepState`` of this optimizer step.
    :param events: the run's event log.
    :return: a ``Verdict`` or None (None means proceed). All results are combined
        with the held data verdicts: STOP > ROLLBACK > SKIP > PROCEED, then agreed across ranks (the
        most severe wins everywhere). SKIP drops the gradients: no optimizer step, no scheduler step.
        ROLLBACK also restores the last verified snapshot (weights and optimizer state). STOP
        restores it too, saves it as a checkpoint and ends the run with the verdict's reason.
    """


@hookspec
def propose_remedies(state: StepState, recovery: Recovery, events: EventLog) -> Remedy | list[Remedy] | None:
    """The ranks agreed on a healable STOP (``state.verdict.healable``) and the core is about to heal it.

    Fires on every rank, after the agreement, the restore of the last verified state and the replay of the
    step, only when the replay's evidence names no sample to quarantine. The core applies the first remedy
    proposed (by any guard), if the recovery budget has room: it calls its ``apply()`` on every rank,
    records a ``remedy`` event with its evidence and its before/after values, and the STOP stays a ROLLBACK
    to the last verified state. With no proposal it picks its own by the evidence (rewind, reset_moments,
    cool-down, tighter clip, retry). Propose the same remedy on every rank; keep what it changed in your
    ``state_dict`` so a resume restores it.

    :param state: the ``StepState`` of the stopping step (``verdict``, ``where``).
    :param recovery: the core's ``Recovery``: ``quarantined``, ``cool``, ``clip``,
        ``rejected`` (``[step, diagnosis]`` of the recent rejected steps) and ``applied``
        (``[step, remedy]``), to read.
    :param events: the run's event log.
    :return: a ``Remedy`` with ``apply`` set (or a list; None: nothing to
        propose). Results are gathered from every implementation; the first one wins.
    """


@hookspec
def on_rollback(state: StepState, restored_step: int, events: EventLog) -> None:
    """A ROLLBACK restored the weights and optimizer state of the last verified snapshot (or a rewind, an
    earlier one from the ring of verified snapshots).

    Fires on every rank, after the restore and before ``on_step_end`` (a rewind: a second time, with the
    earlier step). Guards whose statistics describe
    the weights (a loss window) rewind them here, so the restored state is judged by its own history.

    :param state: the ``StepState`` of the rolled-back step.
    :param restored_step: the step after which the restored state was taken (0: before any update).
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


@hookspec
def on_step_end(state: StepState, events: EventLog) -> None:
    """The optimizer step has been applied, skipped or stopped (``state.verdict`` says which).

    ``state.verdict.decided_by("my_guard")`` says whether your guard was behind it (verdicts combine
    across guards and ranks).

    :param state: the ``StepState`` of this optimizer step.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


@hookspec
def on_log(logs: dict[str, float], state: StepState | None, events: EventLog) -> None:
    """The Trainer is about to log ``logs`` (on logging steps only).

    :param logs: the dict about to be logged; add ``stabguard/<name>`` metrics in place. They reach
        ``trainer_state.json`` and every ``report_to`` integration (TensorBoard, ...).
    :param state: the last ``StepState``, or None before the first step.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """


# ---------------------------------------------------------------------------------------------
# Checkpoints and the end of the run
# ---------------------------------------------------------------------------------------------


@hookspec
def state_dict() -> dict | None:
    """A checkpoint is being written.

    :return: a JSON-serialisable dict of this guard's state (running statistics, counters) or None.
        Results are saved per plugin name in ``stabguard_state.json`` inside the checkpoint.
    """


@hookspec
def load_state_dict(state: dict) -> None:
    """A run resumes from a checkpoint; receives what ``state_dict`` returned for this plugin.

    :param state: the dict this plugin returned from ``state_dict`` when the checkpoint was written.
    :return: ignored.
    """


@hookspec
def on_alert(alert: Alert) -> None:
    """An alert was recorded (grad-norm spike, rollback, ...): send it somewhere a person sees it.

    :param alert: an ``Alert`` (guard, message, step, values).
    :return: ignored; every implementation is called.
    """


@hookspec
def on_train_end(state: StepState | None, reason: str | None, events: EventLog) -> None:
    """Training has ended, normally or by a STOP verdict.

    :param state: the last ``StepState``, or None if no step ran.
    :param reason: None after a normal end, the STOP reason otherwise.
    :param events: the run's event log.
    :return: ignored; every implementation is called.
    """
