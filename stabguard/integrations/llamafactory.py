"""LLaMA-Factory: its SFT workflow with the guarded step, started by ``stabguard llamafactory train``.

    stabguard llamafactory train config.yaml [key=value ...]

(tested with llamafactory 0.9.5). LLaMA-Factory has no hook for its trainer class (``run_exp`` takes
callbacks, which cannot veto a step, and its config rejects unknown keys), so this command reads the
config as ``llamafactory-cli train`` does (LLaMA-Factory's own ``read_args``: the YAML plus ``key=value``
overrides), takes out its ``stabguard:`` key (the same tables as a recipe: ``guards``, ``plugins``, or
``recipe: guards.toml``), gives the SFT workflow's ``CustomSeq2SeqTrainer`` the guarded step and calls
LLaMA-Factory's ``run_exp``. Several processes: ``torchrun --nproc-per-node N $(which stabguard)
llamafactory train config.yaml`` (``llamafactory-cli``'s own relaunch would drop the patch).
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
         ("llamafactory.train.tuner", "run_exp", "the entry point llamafactory-cli train calls")]


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


def train(argv: list[str]) -> None:
    """``llamafactory-cli train`` with the guarded step: ``argv`` is ``[config.yaml, key=value, ...]``."""
    import sys

    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *argv]  # read_args reads the config and overrides from sys.argv, as the CLI does
    args: dict[str, Any] = read_args()
    install(GuardSettings.model_validate(args.pop(SETTINGS_KEY, None) or {}))  # before any model is loaded
    run_exp(args)
