"""LLaMA-Factory: its SFT workflow with the guarded step, started by ``stabguard llamafactory train``.

    stabguard llamafactory train config.yaml [key=value ...]

(tested with llamafactory 0.9.5). LLaMA-Factory has no hook for its trainer class (``run_exp`` takes
callbacks, which cannot veto a step, and its config rejects unknown keys), so this command reads the
config as ``llamafactory-cli train`` does (LLaMA-Factory's own ``read_args``: the YAML plus ``key=value``
overrides), takes out its ``stabguard:`` key (the same tables as a recipe: ``guards``, ``plugins``, or
``recipe: guards.toml``), gives the SFT workflow's ``CustomSeq2SeqTrainer`` the guarded step and calls
LLaMA-Factory's ``run_exp``.

Several processes, as LLaMA-Factory's own launch (``deepspeed: ds_z3_config.json`` or ``ds_z2_config.json``
in the config): ``torchrun --nproc-per-node N $(which stabguard) llamafactory train config.yaml``, or
``FORCE_TORCHRUN=1`` (or several visible devices), where this command starts its workers under torchrun as
``llamafactory-cli train`` does (whose own relaunch would drop the guarded step). Resume with
LLaMA-Factory's ``resume_from_checkpoint``; an ``output_dir`` that holds checkpoints is resumed, as
LLaMA-Factory does, but from the newest one that verifies. ``stabguard.probe=true`` probes the first step
instead of training. FSDP2 (``fsdp``/``fsdp_config``, or ``accelerate launch`` with an FSDP2 config) is
refused under the accelerate 1.11 LLaMA-Factory pins (:func:`stabguard.seams.fsdp2_accelerate_problem`).
"""

from __future__ import annotations

from typing import Any

from stabguard.integrations import GuardSettings, guarded_trainer

SETTINGS_KEY = "stabguard"

# LLaMA-Factory's own names this module relies on (checked by tests/integrations/test_llamafactory.py).
SEAMS = [("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer", "the SFT trainer class, looked up when "
                                                                     "the workflow runs"),
         ("llamafactory.train.callbacks.SaveProcessorCallback", "processor", "the processor (the trainer keeps only "
                                                                            "the tokenizer)"),
         ("llamafactory.hparams.parser", "read_args", "the YAML config plus key=value overrides"),
         ("llamafactory.train.tuner", "run_exp", "the entry point llamafactory-cli train calls"),
         ("llamafactory.extras.misc", "get_device_count", "how many devices llamafactory-cli train starts "
                                                          "workers for"),
         ("llamafactory.extras.misc", "find_available_port", "the port of the workers it starts")]


def install(settings: GuardSettings) -> type:
    """Give the SFT workflow's trainer class the guarded step; returns the class the workflow will build."""
    import llamafactory.train.sft.workflow as sft

    from stabguard.trainer import GuardedTrainer

    base = sft.CustomSeq2SeqTrainer
    if issubclass(base, GuardedTrainer):  # installed before: keep LLaMA-Factory's own class underneath
        base = base.__mro__[2]
    sft.CustomSeq2SeqTrainer = guarded_trainer(base, settings, processor=_saved_processor)
    return sft.CustomSeq2SeqTrainer


def _saved_processor(trainer):
    """LLaMA-Factory hands its processor to a SaveProcessorCallback only."""
    return next((cb.processor for cb in trainer.callback_handler.callbacks
                 if type(cb).__name__ == "SaveProcessorCallback"), None)


def train(argv: list[str]) -> int | None:
    """``llamafactory-cli train`` with the guarded step: ``argv`` is ``[config.yaml, key=value, ...]``.
    Where ``llamafactory-cli`` would start its workers under torchrun, this starts them (running this
    command) and returns their exit status."""
    import subprocess
    import sys

    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    workers = torchrun_command([sys.argv[0], "llamafactory", "train", *argv])
    sys.argv = [sys.argv[0], *argv]  # read_args reads the config and overrides from sys.argv, as the CLI does
    args: dict[str, Any] = read_args()
    settings = GuardSettings.model_validate(args.pop(SETTINGS_KEY, None) or {})  # refused before anything starts
    if workers is not None:
        return subprocess.run(workers).returncode
    install(settings)  # before any model is loaded
    if resumes_on_its_own(args):
        args["resume_from_checkpoint"] = True  # the newest checkpoint that verifies (GuardedTrainer.train)
    run_exp(args)
    return None


def torchrun_command(command: list[str]) -> list[str] | None:
    """The launch ``llamafactory-cli train`` makes of itself (llamafactory/launcher.py): with
    ``FORCE_TORCHRUN=1``, or several devices, it starts its workers under torchrun with its environment
    variables (``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); here the
    workers run ``command``. None inside a worker (``LOCAL_RANK`` set), or where it trains in this process."""
    import os
    import sys

    from llamafactory.extras.misc import find_available_port, get_device_count, is_env_enabled, use_kt, use_ray

    several = get_device_count() > 1 and not use_ray() and not use_kt()
    if "LOCAL_RANK" in os.environ or not (is_env_enabled("FORCE_TORCHRUN") or several):
        return None
    env = os.environ.get
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", env("NNODES", "1"),
            "--node_rank", env("NODE_RANK", "0"), "--nproc_per_node", env("NPROC_PER_NODE", str(get_device_count())),
            "--master_addr", env("MASTER_ADDR", "127.0.0.1"),
            "--master_port", env("MASTER_PORT", str(find_available_port())), *command]


def resumes_on_its_own(args: dict[str, Any]) -> bool:
    """LLaMA-Factory resumes a run whose ``output_dir`` holds checkpoints (unless ``overwrite_output_dir``
    or ``resume_from_checkpoint`` is given) from the highest-numbered one, complete or not; the guarded
    trainer takes the newest that verifies instead (one a kill cut short is passed over)."""
    import os

    from transformers.trainer_utils import get_last_checkpoint

    out = args.get("output_dir")
    return (args.get("resume_from_checkpoint") is None and bool(args.get("do_train")) and bool(out)
            and not args.get("overwrite_output_dir") and os.path.isdir(out) and get_last_checkpoint(out) is not None)
