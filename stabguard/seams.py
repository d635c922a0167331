"""Every private name of transformers and accelerate that the guarded step relies on, in one place.

The Trainer has no public way to veto an optimizer step, so the step hooks into a few of its private
seams. Each one is named here, and ``tests/test_seams.py`` checks every entry of ``SEAMS``: a release
that moves one fails that test with the seam's name, instead of giving NaN logs.
"""

from __future__ import annotations

from pathlib import Path

import torch

# (owner, name, what stabguard does with it). Overridden methods are also checked to be called by the loop.
SEAMS = [
    ("transformers.Trainer", "_clip_grad_norm", "overridden: called once per optimizer step after accumulation; "
                                                "the guarded step runs here"),
    ("transformers.Trainer", "_get_grad_norm", "overridden: reached instead when max_grad_norm == 0"),
    ("transformers.Trainer", "_save_checkpoint", "overridden: guard state and the manifest (the commit) are "
                                                 "written into every checkpoint; its rotation is held off "
                                                 "(args.save_total_limit = None) until the commit"),
    ("transformers.Trainer", "_load_optimizer_and_scheduler", "overridden: guard state is read back on resume "
                                                              "(every engine, DeepSpeed included, comes here)"),
    ("transformers.Trainer", "_get_output_dir", "where checkpoints go"),
    ("transformers.Trainer", "_tr_loss", "the on-device loss sum since the last log line; a dropped step's "
                                         "loss is taken back out"),
    ("transformers.Trainer", "_finalize_training", "divides the final train_loss by the steps of this train() "
                                                   "(_initial_global_step, 5.2x) or by global_step (older); "
                                                   "dropped steps are taken out of that divisor"),
    ("accelerate.optimizer.AcceleratedOptimizer", "_is_overflow", "set for a dropped step: the Trainer then "
                                                                  "holds the LR scheduler"),
    ("accelerate.optimizer.AcceleratedOptimizer", "scaler", "fp16 AMP's GradScaler; a skipped step closes it"),
    ("accelerate.utils.FullyShardedDataParallelPlugin", "fsdp_version", "FSDP1 (flat parameters) is refused; "
                                                                        "FSDP2 gradients are DTensors"),
    ("accelerate.utils.FullyShardedDataParallelPlugin", "state_dict_type", "sharded: the final save_model writes "
                                                                           "no weights; the adapter is gathered"),
    ("accelerate.Accelerator", "deepspeed_engine_wrapped", "replaced by stabguard.zero.GuardedEngineWrapper"),
    ("accelerate.utils.deepspeed.DeepSpeedEngineWrapper", "backward", "mirrored by GuardedEngineWrapper.backward, "
                                                                      "with the guarded step before engine.step()"),
    ("transformers.trainer_callback.ProgressCallback", "on_log", "replaced on the run's instance: the console's "
                                                                 "compact line stands in for the log dict"),
    ("torch", "_foreach_mul_", "scales the local shards of sharded gradients by the clip coefficient, on the device"),
    ("torch", "_foreach_norm", "one norm per gradient tensor in the step's single norm pass, kept on the device "
                               "for where.py"),
    ("pluggy.HookCaller", "get_hookimpls", "one call per plugin for state_dict/load_state_dict (a hook call "
                                           "merges the results)"),
    ("pluggy.HookImpl", "function", "wrapped at registration: an exception becomes a HookError naming the hook"),
]

# DeepSpeed's own (stabguard.zero), checked when DeepSpeed is installed.
DEEPSPEED_SEAMS = [
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", name, why) for name, why in [
        ("scaled_global_norm", "ZeRO-1/2's norm: measured before the step, then given back to it"),
        ("check_overflow", "replaced for one step: it answers with the veto (the measured norm covers a real "
                           "overflow)"),
        ("check_grad_overflow", "turned on for one step, so the overflow check runs in bf16 too"),
        ("clip_grad", "the guards' clip for one step"),
        ("single_partition_of_fp32_groups", "this rank's fp32 master partitions (snapshot)"),
        ("bit16_groups_flat", "the 16-bit weights every rank holds (snapshot)"),
    ]
] + [
    ("deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3", name, why) for name, why in [
        ("_get_norm_groups", "ZeRO-3's norm: measured before the step, then given back to it"),
        ("clip_grad", "the guards' clip for one step"),
        ("fp32_partitioned_groups_flat", "this rank's fp32 master partitions (snapshot)"),
        ("fp16_partitioned_groups_flat", "this rank's 16-bit weight partitions (snapshot)"),
        ("checkpoint_event_prologue", "partitions every parameter before a restore"),
        ("checkpoint_event_epilogue", "re-gathers the persistent parameters after a restore"),
        ("loss_scale", "the norm it measures is scaled by it"),
    ]
] + [
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", name, why) for name, why in [
        ("overflow", "the flag the replaced check_overflow sets: the veto"),
        ("loss_scale", "the norm it measures is scaled by it"),
        ("partition_gradients", "ZeRO-2 (True) or ZeRO-1 (False)"),
    ]
] + [("deepspeed.runtime.utils", "combine_grad_norm_groups", "ZeRO-3's group norms into one"),
     ("deepspeed.utils", "safe_get_full_grad", "a parameter's whole gradient from the partitions (where.py, "
                                               "anomalous steps only)"),
     ("deepspeed.runtime.fp16.loss_scaler", "OVERFLOW! Skipping step", "the line DeepSpeed logs for an overflow; "
                                                                         "filtered out for a guard's veto")]


def hook_impls(caller) -> list:
    """The implementations of one hook, each called on its own (``call_impl``)."""
    return caller.get_hookimpls()


def call_impl(impl, **kwargs):
    return impl.function(**kwargs)


def silence_progress_log(callback) -> None:
    """transformers' progress bar prints each log dict; the console's compact line replaces it."""
    callback.on_log = lambda *args, **kwargs: None


def loss_sum(trainer) -> torch.Tensor | None:
    """The Trainer's running loss since its last log line (a device tensor), or None before training."""
    return getattr(trainer, "_tr_loss", None)


def train_loss_steps(trainer) -> int:
    """The steps the Trainer divided its final ``train_loss`` by. Releases that keep ``_initial_global_step``
    (set when ``train()`` starts) count the steps of this call; older ones count every step since step 0."""
    return trainer.state.global_step - getattr(trainer, "_initial_global_step", 0)


def output_dir(trainer) -> Path:
    return Path(trainer._get_output_dir(trial=None))


def grad_scaler(optimizer):
    """fp16 AMP's GradScaler of an accelerate-wrapped optimizer, or None."""
    return getattr(optimizer, "scaler", None)


FSDP2_MIN_ACCELERATE = "1.13"


def fsdp2_accelerate_problem() -> str | None:
    """Why the installed accelerate cannot run the guarded step under FSDP2, or None.

    Before 1.13, accelerate loads a sharded FSDP2 checkpoint's optimizer state against
    ``optimizer.state_dict()`` (keys by index) while saving it by parameter name: nothing matches, and a
    resume continues with fresh optimizer state, silently (measured: tests/test_fsdp.py on 1.11 and 1.12).
    """
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("accelerate")
    if Version(installed) >= Version(FSDP2_MIN_ACCELERATE):
        return None
    return (f"FSDP2 needs accelerate >= {FSDP2_MIN_ACCELERATE} (installed {installed}): older releases resume a "
            f"sharded checkpoint without its optimizer state; pip install 'accelerate>={FSDP2_MIN_ACCELERATE}'")


def fsdp_full_state_dict(accelerator) -> bool:
    """Whether FSDP saves full state dicts; the Trainer's final ``save_model`` writes weights only then."""
    return "FULL_STATE_DICT" in str(accelerator.state.fsdp_plugin.state_dict_type)


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when the accelerator runs FSDP, else None."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else getattr(plugin, "fsdp_version", 1)


def deepspeed_engine_wrapper(accelerator):
    """accelerate's wrapper of the DeepSpeed engine, whose ``backward`` also runs ``engine.step()``."""
    return accelerator.deepspeed_engine_wrapped


def set_deepspeed_engine_wrapper(accelerator, wrapper) -> None:
    accelerator.deepspeed_engine_wrapped = wrapper


def mark_step_skipped(optimizer, skipped: bool) -> None:
    """Tell the Trainer whether this optimizer step was skipped; a skipped step holds the LR scheduler.

    accelerate's ``optimizer_step_was_skipped`` reads ``_is_overflow``, which the GradScaler sets under
    fp16 AMP. For a dropped step the next ``optimizer.step()`` is replaced by a one-shot no-op that sets
    the flag (and closes the scaler's step as a skipped AMP step does).
    """
    scaler = grad_scaler(optimizer)
    if not skipped:
        if hasattr(optimizer, "_is_overflow") and scaler is None:
            optimizer._is_overflow = False
        return

    def skipped_step(*args, **kwargs):
        del optimizer.step  # one call only: the real step is back for the next optimizer step
        optimizer._is_overflow = True
        if scaler is not None:
            scaler.update()

    optimizer.step = skipped_step
