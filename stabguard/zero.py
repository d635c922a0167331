"""The guarded step under DeepSpeed ZeRO-1/2/3: measured before the engine's update, vetoed through its own skip.

accelerate runs DeepSpeed's ``engine.step()`` inside ``backward`` (``DeepSpeedEngineWrapper.backward``),
and ZeRO keeps the gradients in its own partitions, not in ``p.grad``. ``GuardTrainer`` therefore puts
:class:`GuardedEngineWrapper` in the place of accelerate's wrapper: at each accumulation boundary it runs
the guarded step between the engine's backward and its step, through a :class:`ZeroEngine`:

- **measure**: DeepSpeed's own norm of this rank's gradient partitions, all-reduced across the
  data-parallel group (ZeRO-1/2 ``scaled_global_norm``, ZeRO-3 ``_get_norm_groups``), divided by the loss
  scale. DeepSpeed reports a NaN gradient as an infinite norm. The engine's step reuses this value: one
  norm pass per step.
- **veto**: the engine's step takes DeepSpeed's own overflow path: the optimizer drops the gradients,
  the engine holds its LR scheduler and counts the step in ``skipped_steps``, and accelerate reports the
  step as skipped. ZeRO-1/2: the step's overflow check (turned on, bf16 included) answers with the veto;
  ZeRO-3: the step is shown an infinite norm, which it treats as an overflow in every dtype.
- **clip**: the guards' clip (``training.max_grad_norm`` included; the smallest request wins) is the
  optimizer's ``clip_grad`` for that step.
- **snapshot**: copies of this rank's fp32 master partitions, the optimizer state of those partitions
  and the 16-bit weights (ZeRO-1/2: the flat copy every rank holds; ZeRO-3: this rank's partition),
  restored in place on every rank at the same agreed verdict. ZeRO-3 re-gathers its persistent
  parameters afterwards, as DeepSpeed does after loading a checkpoint.

Under fp16 with dynamic loss scaling a vetoed step also counts as an overflow for the loss scaler
(DeepSpeed's skip path lowers the scale); bf16, the Qwen default, has no loss scaler.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from stabguard.engine import Kept, keep, put_back
from stabguard.verdict import GuardError


def zero_optimizer(trainer):
    """DeepSpeed's ZeRO optimizer behind the Trainer's (accelerate-wrapped) optimizer."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def zero_stage(optimizer) -> int | None:
    """1 or 2 (``DeepSpeedZeroOptimizer``), 3 (``DeepSpeedZeroOptimizer_Stage3``), else None."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return 2 if optimizer.partition_gradients else 1
    return None


def link_round_robin(optimizer) -> None:
    """With ``round_robin_gradients`` (LLaMA-Factory's ds_z2_config.json), ZeRO-1/2 lays the parameters out
    in its flat partitions in another order than the model's, but DeepSpeed (0.19) maps each parameter to
    its place in the model's order unless the layout has padding: ``safe_get_full_grad`` then reads
    another tensor's fragment ("The size of tensor a (512) must match the size of tensor b (256)"). Link
    them at their real offsets, as DeepSpeed's own padded branch of ``_link_all_hp_params`` does."""
    from deepspeed.utils.mixed_precision_linkage import link_hp_params

    if not getattr(optimizer, "round_robin_gradients", False):
        return
    for i, group in enumerate(optimizer.bit16_groups):
        if any(optimizer.round_robin_bit16_padding[i]):
            continue  # DeepSpeed linked this group at the real offsets itself
        dp_group = optimizer.real_dp_process_group[i]
        partition_size = optimizer.bit16_groups_flat[i].numel() // torch.distributed.get_world_size(dp_group)
        offsets = dict(zip(map(id, optimizer.round_robin_bit16_groups[i]), optimizer.round_robin_bit16_offsets[i]))
        link_hp_params(lp_param_list=group, flat_hp_partition=optimizer.single_partition_of_fp32_groups[i],
                       gradient_dict=optimizer.averaged_gradients,
                       offload_gradient_dict=optimizer.offload_gradient_dict,
                       use_offload=optimizer.cpu_offload, param_group_index=i,
                       partition_start=torch.distributed.get_rank(group=dp_group) * partition_size,
                       partition_size=partition_size, dp_group=dp_group,
                       param_offsets=[offsets[id(p)] for p in group])


class ZeroEngine:
    """What the guarded step does on a DeepSpeed ZeRO optimizer; one per training run."""

    def __init__(self, optimizer):
        self.optimizer, self.stage = optimizer, zero_stage(optimizer)
        if self.stage is None:
            raise GuardError(f"training.deepspeed: stabguard guards ZeRO stages 1-3; this engine's optimizer is "
                             f"{type(optimizer).__name__} (ZeRO stage 0): use DDP, or zero_optimization.stage >= 1")
        if self.stage < 3:
            link_round_robin(optimizer)
        self.norm: torch.Tensor | None = None  # this step's scaled norm, as the engine's step will read it
        self.vetoed = False
        self.max_norm: float | None = None

    # -- the guarded step's side -------------------------------------------------------------------

    def grad_norm(self, model) -> torch.Tensor:
        """Global L2 norm of the gradients (unscaled), the same on every rank; measured once per step."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        opt = self.optimizer
        self.norm = opt.scaled_global_norm() if self.stage < 3 else combine_grad_norm_groups(opt._get_norm_groups())
        self.vetoed, self.max_norm = False, None
        return self.norm / opt.loss_scale

    def clip(self, model, max_norm, norm) -> None:
        self.max_norm = float(max_norm)  # DeepSpeed compares it on the host anyway

    def proceed(self, optimizer) -> None:
        self.vetoed = False

    def drop(self, model, optimizer) -> None:
        self.vetoed = True

    def snapshot(self, step: int, model, optimizer, offload: bool, guard_state) -> ZeroSnapshot:
        return ZeroSnapshot(step, self.optimizer, self.stage, offload, guard_state)

    def tensor_norms(self, model) -> tuple[list[str], torch.Tensor]:
        """Each trainable parameter's gradient norm, gathered from the ZeRO partitions with DeepSpeed's
        ``safe_get_full_grad`` (a collective per parameter: anomalous steps only, every rank together)."""
        from deepspeed.utils import safe_get_full_grad

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        norms = []
        for _, p in named:
            grad = safe_get_full_grad(p)
            norms.append(torch.zeros(()) if grad is None else torch.linalg.vector_norm(grad.float()).cpu())
        scale = float(self.optimizer.loss_scale)  # fp16: the partitions hold scaled gradients
        return [n for n, _ in named], torch.stack(norms) / scale if norms else torch.zeros(0)

    def replayable(self, model) -> bool:
        return self.stage < 3  # ZeRO-3: a forward gathers every rank's partitions

    def missing_gradients(self, model) -> list[str]:
        return []  # the gradients live in DeepSpeed's partitions, never in p.grad

    # -- the engine's step -------------------------------------------------------------------------

    @contextlib.contextmanager
    def deciding(self):
        """Around ``engine.step()``: its norm is the measured one (inf when vetoed), its clip the guards'."""
        opt, norm = self.optimizer, self.norm
        if norm is None:  # the guarded step did not run (no boundary): DeepSpeed as it is
            yield
            return
        if self.vetoed:
            norm = torch.full_like(norm, float("inf"))
        saved = {"clip_grad": opt.clip_grad}
        if self.max_norm is not None:
            opt.clip_grad = self.max_norm
        if self.stage < 3:
            vetoed = self.vetoed
            saved["check_grad_overflow"] = opt.check_grad_overflow
            opt.check_grad_overflow = True  # an infinite norm is an overflow, bf16 included
            # The veto is the overflow check (the measured norm covers a real overflow: no second pass),
            # so it holds with zero_optimization.compute_grad_norm = false too.
            opt.check_overflow = lambda *args, **kwargs: setattr(opt, "overflow", vetoed)
            opt.scaled_global_norm = lambda *args, **kwargs: norm
        else:
            opt._get_norm_groups = lambda: [norm]
        quiet = _quiet_overflow_warning() if self.vetoed else contextlib.nullcontext()
        try:
            with quiet:
                yield
        finally:
            for name in ("check_overflow", "scaled_global_norm", "_get_norm_groups"):
                opt.__dict__.pop(name, None)  # the class's methods are back
            for name, value in saved.items():
                setattr(opt, name, value)
            self.norm = None


class _NoOverflowLine(logging.Filter):
    def filter(self, record):
        return "OVERFLOW! Skipping step" not in record.getMessage()


@contextlib.contextmanager
def _quiet_overflow_warning():
    """A vetoed step is not an overflow: DeepSpeed's "OVERFLOW! Skipping step. Gradients are non-finite"
    would misname it (stabguard's own event gives the reason)."""
    from deepspeed.utils import logger

    line = _NoOverflowLine()
    logger.addFilter(line)
    try:
        yield
    finally:
        logger.removeFilter(line)


class ZeroSnapshot:
    """This rank's fp32 master partitions, their optimizer state and the 16-bit weights after ``step``.

    The same interface as :class:`stabguard.engine.Snapshot`: ``step``, ``guard_state`` and ``restore``.
    """

    def __init__(self, step: int, optimizer, stage: int, offload: bool, guard_state=None):
        self.step, self.guard_state, self.zero, self.stage = step, guard_state or {}, optimizer, stage
        masters, weights = self._tensors()
        self.masters = [Kept(t, offload) for t in masters]
        self.weights = [None if t is None else Kept(t, offload) for t in weights]
        base = optimizer.optimizer  # the client optimizer (AdamW...) that steps the fp32 partitions
        self.optim = [{k: keep(v, offload) for k, v in base.state[t].items()} if t in base.state else None
                      for t in masters]

    def _tensors(self):
        if self.stage < 3:
            return self.zero.single_partition_of_fp32_groups, self.zero.bit16_groups_flat
        return self.zero.fp32_partitioned_groups_flat, self.zero.fp16_partitioned_groups_flat

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        if self.stage == 3:
            self.zero.checkpoint_event_prologue()  # partition every parameter before the partitions change
        masters, weights = self._tensors()
        base = self.zero.optimizer
        for live, kept, state in zip(masters, self.masters, self.optim, strict=True):
            kept.into(live)
            if state is None:  # no state yet at snapshot time: the optimizer starts it afresh, as it did then
                base.state.pop(live, None)
            else:
                base.state[live] = put_back(base.state.get(live, {}), state)
        for live, kept in zip(weights, self.weights, strict=True):
            if kept is not None and live is not None:
                kept.into(live)
        if self.stage == 3:
            self.zero.checkpoint_event_epilogue()  # persistent parameters re-gathered from the partitions


class GuardedEngineWrapper:
    """accelerate's ``DeepSpeedEngineWrapper``, with the guarded step between backward and the engine's step."""

    def __init__(self, wrapped, guarded, run_step):
        self.wrapped, self.engine, self.guarded, self.run_step = wrapped, wrapped.engine, guarded, run_step
        self.zero = ZeroEngine(self.engine.optimizer)

    def backward(self, loss, sync_gradients=True, **kwargs):
        """accelerate's ``backward`` with ``run_step(engine, zero)`` before the engine's step."""
        self.guarded.add_loss(loss.detach())
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)
        if sync_gradients:
            self.run_step(self.engine, self.zero)
            with self.zero.deciding():
                self.engine.step()

    def __getattr__(self, name):  # get_global_grad_norm and whatever else accelerate asks of its wrapper
        return getattr(self.wrapped, name)
