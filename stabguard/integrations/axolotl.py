"""Axolotl: ``axolotl train config.yml`` with the guarded step, through Axolotl's own plugin mechanism.

In the config (tested with axolotl 0.19.0)::

    plugins:
      - stabguard.integrations.axolotl.StabguardPlugin
    stabguard:                      # optional; the same tables as a stabguard recipe
      guards:
        nonfinite: {}
        mask: {policy: warn}
      # recipe: guards.toml         # or a stabguard recipe whose plugins and [guards.*] tables to use

Several GPUs, as Axolotl launches them (tested on 2 CPU ranks, gloo: tests/integrations/test_axolotl.py)::

    axolotl train config.yml --launcher torchrun -- --nproc_per_node 8   # or Axolotl's default, accelerate
    # with, in config.yml, one of:
    deepspeed: deepspeed_configs/zero3.json   # or zero2.json, zero3_bf16.json (`axolotl fetch deepspeed_configs`)
    fsdp_version: 2                           # with fsdp_config: {...}

Resuming: ``resume_from_checkpoint: <output_dir>/checkpoint-N`` is verified against its manifest (a damaged
one is refused, naming the newest good one); with ``auto_resume_from_checkpoints: true`` the newest checkpoint
that verifies is taken (Axolotl's own pick, the highest number, may be one a kill left half-written).
``stabguard: {probe: true}`` runs the probe (:mod:`stabguard.integrations.probe`) instead of training.

Axolotl validates the ``stabguard:`` key with :class:`StabguardArgs` (an unknown guard or option fails
the config before any model is loaded). ``get_trainer_cls`` returns the class Axolotl would have built
(``AxolotlTrainer``, or another plugin's or ``trainer_cls:``) with the guarded step; the first plugin that
returns a class wins, so list this one first. Axolotl passes the tokenizer as ``processing_class``; the
guards read labels with the processor of its multimodal collator.
"""

from __future__ import annotations

from types import SimpleNamespace

from axolotl.integrations.base import BasePlugin, PluginManager
from pydantic import BaseModel

from stabguard.integrations import GuardSettings, guarded_trainer

# Axolotl's own names this module relies on (checked by tests/integrations/test_axolotl.py).
SEAMS = [("axolotl.core.builders.causal.HFCausalTrainerBuilder", "_get_trainer_cls",
          "the trainer class Axolotl picks when no plugin returns one: the class that gets the guarded step"),
         ("axolotl.integrations.base.PluginManager", "get_instance", "the loaded plugins, asked in order")]


class StabguardArgs(BaseModel):
    """The ``stabguard:`` key of an Axolotl config (merged into Axolotl's config model)."""

    stabguard: GuardSettings | None = None


class StabguardPlugin(BasePlugin):
    """Gives Axolotl's trainer the guarded step; options under the config's ``stabguard:`` key."""

    def get_input_args(self) -> str:
        return "stabguard.integrations.axolotl.StabguardArgs"

    def get_trainer_cls(self, cfg):
        if cfg.rl:  # Axolotl's RL builder drops its positional arguments for a plugin's class
            raise ValueError("stabguard: Axolotl's RL trainers (rl: ...) are not guarded yet; remove the plugin "
                             "from `plugins:` for this run")
        settings = GuardSettings.model_validate(dict(cfg.stabguard or {}))
        trainer_cls = guarded_trainer(self._base_class(cfg), settings, processor=_collator_processor)
        if cfg.auto_resume_from_checkpoints and not cfg.resume_from_checkpoint:
            return _resumes_from_newest_verified(trainer_cls)
        return trainer_cls

    def post_trainer_create(self, cfg, trainer):
        from stabguard.trainer import GuardedTrainer

        if not isinstance(trainer, GuardedTrainer):
            raise ValueError(f"stabguard: the trainer is {type(trainer).__name__}, without the guarded step: "
                             "another plugin's get_trainer_cls came first; list "
                             "stabguard.integrations.axolotl.StabguardPlugin first under `plugins:`")

    def _base_class(self, cfg) -> type:
        """The class Axolotl would use without this plugin: another plugin's, else its builder's own pick."""
        for plugin in PluginManager.get_instance().plugins.values():
            found = None if plugin is self else plugin.get_trainer_cls(cfg)
            if found is not None:
                return found
        from axolotl.core.builders.causal import HFCausalTrainerBuilder
        from axolotl.utils.dict import DictDefault

        return HFCausalTrainerBuilder._get_trainer_cls(SimpleNamespace(cfg=DictDefault({**cfg, "plugins": None})))


def _collator_processor(trainer):
    """The processor of Axolotl's multimodal collator (its processing strategy holds it), if any."""
    collator = getattr(trainer.data_collator, "collator", trainer.data_collator)
    return getattr(getattr(collator, "processing_strategy", None), "processor", None)


def _resumes_from_newest_verified(trainer_cls: type) -> type:
    """``auto_resume_from_checkpoints``: Axolotl passes its highest-numbered ``checkpoint-N``, complete or not
    (a run killed while saving leaves one without its manifest), which the guarded trainer would refuse; it
    gets ``True`` instead: the newest checkpoint that verifies, as ``stabguard run --resume last`` takes."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        return trainer_cls.train(self, True if resume_from_checkpoint else None, *args, **kwargs)

    return type(trainer_cls.__name__, (trainer_cls,), {"train": train, "__module__": trainer_cls.__module__,
                                                       "__doc__": trainer_cls.__doc__})
