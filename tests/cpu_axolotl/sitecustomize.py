"""Test-only: Axolotl's own command on several CPU ranks (tests/integrations/test_axolotl.py puts this folder
on ``PYTHONPATH``; Python imports ``sitecustomize`` at start-up, and the workers of a launch get the patches).

Axolotl has no key for a CPU run (the Trainer's ``use_cpu``), so on a machine without an accelerator three
things that its GPU path never meets refuse a multi-rank run; each is answered here as for a device that
cannot do what was asked, and nothing changes on a machine with CUDA:

- ``axolotl.utils.environment.check_cuda_p2p_support`` asks CUDA, at config load, whether a rank's GPU can
  reach its neighbour's (to set ``NCCL_P2P_DISABLE``); ``torch.cuda.can_device_access_peer`` raises
  "Found no NVIDIA driver on your system". Here: no peer access (Axolotl sets ``NCCL_P2P_DISABLE=1``,
  which gloo ignores).
- accelerate's ``PartialState`` picks the process group's backend for the accelerator it finds (nccl on
  GPUs) and, finding none and not told ``cpu``, none at all: each rank believes it is alone (world size 1:
  DeepSpeed then refuses its own batch size, "train_batch_size is not equal to micro_batch_per_gpu *
  gradient_acc_step * world_size 2 != 2 * 1 * 2"). Here: gloo across the CPU ranks, as ``cpu=True`` does.
- FSDP2: ``axolotl.utils.distributed.build_parallelism_config`` builds accelerate's device mesh on "cuda"
  (``torch.cuda.set_device`` raises "Found no NVIDIA driver"). Here: the mesh on the CPU ranks.

Not about the CPU: Axolotl builds the LoRA layers before anything seeds torch (the Trainer seeds later), so
each launch draws other LoRA A weights (measured: step 1's gradient norm 0.47 to 0.55 over six launches of
one config, the same loss); a killed and resumed run is compared with another run only if both start from
the same weights, so every worker seeds torch at start-up (``seeded``).

FSDP2 also needs accelerate's CPU gate lifted: tests/cpu_fsdp/sitecustomize.py, loaded from here (only one
``sitecustomize`` is imported).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def no_peer_access_without_cuda() -> None:
    import torch

    torch.cuda.can_device_access_peer = lambda device, peer_device: False


def gloo_without_an_accelerator() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare = PartialState._prepare_backend

    def patched(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = prepare(self, cpu, sagemaker_dp, backend)
        return prepare(self, True, sagemaker_dp, backend) if kind == DistributedType.NO and not cpu else (chosen, kind)

    PartialState._prepare_backend = patched


def mesh_on_cpu() -> None:
    from accelerate.parallelism_config import ParallelismConfig

    build = ParallelismConfig.build_device_mesh
    ParallelismConfig.build_device_mesh = lambda self, device_type: build(
        self, "cpu" if device_type == "cuda" else device_type)


def lift_accelerate_cpu_gate() -> None:
    path = Path(__file__).parent.parent / "cpu_fsdp" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("stabguard_tests_cpu_fsdp", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # lifts the gate in a worker (LOCAL_RANK set)


def seeded() -> None:
    import torch

    torch.manual_seed(0)


def cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


if "LOCAL_RANK" in os.environ:  # a worker of a launch
    seeded()
if "LOCAL_RANK" in os.environ and cuda_missing():  # on a machine without CUDA
    no_peer_access_without_cuda()
    gloo_without_an_accelerator()
    mesh_on_cpu()
    lift_accelerate_cpu_gate()
