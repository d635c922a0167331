"""Test-only: FSDP2 on CPU ranks, for launches that cannot patch their own workers (a framework's command).

accelerate (state.py) sets ``DistributedType.FSDP`` only for accelerator device types; on a CPU
(``MULTI_CPU``) it drops the FSDP plugin and the run trains as plain data parallel. :func:`lift_cpu_gate`
puts it back, exactly as its accelerator branch would. A test puts this folder on ``PYTHONPATH``; Python
imports ``sitecustomize`` at start-up, and the workers of a launch (``LOCAL_RANK`` set) get the patch.
tests/engine_worker.py calls :func:`lift_cpu_gate` itself.
"""

from __future__ import annotations

import os


def lift_cpu_gate() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "cpu_gate_lifted", False):
        return

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    patched.cpu_gate_lifted = True
    AcceleratorState.__init__ = patched


if "LOCAL_RANK" in os.environ:  # a worker, not the launcher
    lift_cpu_gate()
