"""ms-swift: ``swift sft ...`` with the guarded step, through ms-swift's own ``--external_plugins``.

    swift sft ... --external_plugins "$(python -m stabguard.integrations.ms_swift)"

(tested with ms-swift 4.6.0). The plugin file replaces the SFT entry of ``TrainerFactory.TRAINER_MAPPING``
(ms-swift looks the class up there by its dotted name when the run starts) with ms-swift's own
``Seq2SeqTrainer`` given the guarded step. ms-swift's command line has no place for guard options, so
they come from the environment (see :func:`stabguard.integrations.settings_from_env`):
``STABGUARD_RECIPE=guards.toml`` and/or ``STABGUARD_GUARDS='{"mask": {"policy": "warn"}}'``.

ms-swift passes the tokenizer as ``processing_class``; the guards read labels with its template's
processor. Its own NaN fix (``_fix_grad_norm_nan``, which drops NaN gradients but still steps the LR
scheduler) is not reached: the guarded step measures and clips the gradients itself.

Several GPUs are ms-swift's own launch, unchanged (tested on 2 CPU ranks: ``NPROC_PER_NODE=2`` makes
``swift sft`` start torchrun; every rank loads this plugin; one events.jsonl in the run's folder)::

    NPROC_PER_NODE=2 swift sft ... --deepspeed zero3 --external_plugins "$(python -m stabguard.integrations.ms_swift)"
    # or --deepspeed zero2, or --fsdp fsdp2 (its preset saves sharded: the adapter is in pytorch_model_fsdp_0)
    NPROC_PER_NODE=2 swift sft ... --resume_from_checkpoint output/v0-<time>/checkpoint-N  # the guard state too
    STABGUARD_PROBE=1 swift sft ...  # the first step with its update vetoed, the probe's report, exit 0 or 1

A resumed run writes into a new versioned folder (v1-<time>); the checkpoint is verified against its
manifest first. ``--resume_only_model true`` restores the step and the guard state, not the optimizer.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from stabguard.integrations import guarded_trainer, settings_from_env

GUARDED = ("causal_lm",)  # swift sft / swift pt; the RLHF trainers are not guarded yet
EXTERNAL_PLUGIN = Path(__file__).with_name("swift_external") / "stabguard_swift.py"

# ms-swift's own names this module relies on (checked by tests/integrations/test_ms_swift.py).
SEAMS = [("swift.trainers.TrainerFactory", "TRAINER_MAPPING", "task -> dotted trainer class; looked up at run start"),
         ("swift.trainers.Seq2SeqTrainer", "template", "the template whose processor the guards read labels with")]


def install() -> None:
    """Point ms-swift's SFT trainer mapping at its own class with the guarded step (idempotent)."""
    from swift.trainers import TrainerFactory

    settings = settings_from_env()
    module = sys.modules[__name__]
    for task in GUARDED:
        path, name = TrainerFactory.TRAINER_MAPPING[task].rsplit(".", 1)
        if path == __name__:
            continue
        base = getattr(importlib.import_module(path), name)
        setattr(module, f"guarded_{task}", guarded_trainer(base, settings, processor=_template_processor))
        TrainerFactory.TRAINER_MAPPING[task] = f"{__name__}.guarded_{task}"


def _template_processor(trainer):
    return getattr(getattr(trainer, "template", None), "processor", None)


if __name__ == "__main__":
    print(EXTERNAL_PLUGIN)
