"""Test-only: DeepSpeed ZeRO-3 on CPU ranks, for launches that cannot patch their own workers (a framework's command).

On CPU ranks the Trainer needs ``use_cpu`` (else accelerate finds no backend and each rank thinks it is
alone). accelerate's CPU branch (state.py) then starts torch.distributed, but not ``deepspeed.comm``, which
its accelerator branch starts for a DeepSpeed run. ZeRO-3 loads the model inside ``deepspeed.zero.Init``,
whose config reads the world size from ``deepspeed.comm`` before it starts it, so it counts 1 rank and
refuses the batch size ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
world_size 2 != 1 * 1 * 1"). :func:`start_deepspeed_comm` makes the call the accelerator branch makes,
on the process group accelerate started. A test puts this folder on ``PYTHONPATH`` for a DeepSpeed launch;
Python imports ``sitecustomize`` at start-up, and the workers of a launch (``LOCAL_RANK`` set) get the patch.
"""

from __future__ import annotations

import os


def start_deepspeed_comm() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    init = PartialState.__init__
    if getattr(init, "deepspeed_comm_started", False):
        return

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            from deepspeed import comm

            if not comm.is_initialized():
                comm.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)

    patched.deepspeed_comm_started = True
    PartialState.__init__ = patched


if "LOCAL_RANK" in os.environ:  # a worker, not the launcher
    start_deepspeed_comm()
