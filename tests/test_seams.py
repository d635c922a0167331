"""stabguard/seams.py: every private transformers/accelerate name the guarded step relies on is still there.

A release that moves one fails here, with the seam's name, instead of giving NaN logs.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import transformers

from stabguard.seams import DEEPSPEED_SEAMS, SEAMS


def version_of(owner: str) -> str:
    from importlib.metadata import version

    package = owner.split(".")[0]
    return f"{package} {version(package)}"


def owner_object(owner: str):
    module, _, name = owner.rpartition(".")
    return getattr(importlib.import_module(module), name)


def owner_source(owner: str) -> str:
    return inspect.getsource(owner_object(owner))


@pytest.mark.parametrize("owner, name, why", SEAMS + DEEPSPEED_SEAMS,
                         ids=[f"{o.rsplit('.', 1)[-1]}.{n}" for o, n, _ in SEAMS + DEEPSPEED_SEAMS])
def test_each_seam_is_still_there(owner, name, why):
    if owner.startswith("deepspeed."):
        pytest.importorskip("deepspeed")
    assert seam_is_there(owner, name), (
        f"{owner}.{name} is gone from this release ({version_of(owner)}; stabguard uses it: {why})")


def seam_is_there(owner: str, name: str) -> bool:
    """A method or attribute of a class (assigned in its code), an attribute of a module, or a text a
    module logs (a seam named by its words)."""
    try:
        module = importlib.import_module(owner)
    except ImportError:
        module = None
    if module is not None:
        return hasattr(module, name) or name in inspect.getsource(module)
    src = owner_source(owner)
    return f"def {name}(" in src or f"self.{name}" in src or hasattr(owner_object(owner), name)


def test_the_training_loop_still_calls_the_overridden_seams_in_order():
    src = inspect.getsource(transformers.Trainer)
    order = ["grad_norm = self._clip_grad_norm(model)", "grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)",
             "self.optimizer.step()", "self.accelerator.optimizer_step_was_skipped", "self.lr_scheduler.step()"]
    places = [src.find(line) for line in order]
    for line, place in zip(order, places):
        assert place >= 0, f"transformers {transformers.__version__} no longer has `{line}` in its training loop"
    assert places == sorted(places), "the Trainer's step no longer runs clip -> optimizer.step -> scheduler"
    for seam in ("def _clip_grad_norm(self, model)", "def _get_grad_norm(self, model, grad_norm=None)",
                 "def _save_checkpoint(self, model", "def _load_optimizer_and_scheduler(self, checkpoint",
                 "def get_decay_parameter_names(self, model", "def training_step(", "def prediction_step("):
        assert seam in src, f"transformers {transformers.__version__} moved `{seam}`"


def test_the_final_train_loss_is_divided_as_seams_train_loss_steps_reads_it():
    src = inspect.getsource(transformers.Trainer._finalize_training)
    divisors = ["self.state.global_step - self._initial_global_step", "max(self.state.global_step, 0.001)"]
    assert any(d in src for d in divisors), (
        f"transformers {transformers.__version__} divides train_loss in a new way: update seams.train_loss_steps")


def test_accelerate_reads_the_skip_flag_the_step_sets():
    from accelerate.optimizer import AcceleratedOptimizer

    src = inspect.getsource(AcceleratedOptimizer.step_was_skipped.fget)
    assert "_is_overflow" in src, "accelerate's step_was_skipped no longer reads _is_overflow"


def test_accelerate_still_steps_deepspeed_inside_backward_as_the_guarded_wrapper_mirrors():
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    src = inspect.getsource(DeepSpeedEngineWrapper.backward)
    order = ["self.engine.set_gradient_accumulation_boundary(", "self.engine.backward(loss", "self.engine.step()"]
    places = [src.find(line) for line in order]
    assert -1 not in places and places == sorted(places), (
        "accelerate's DeepSpeedEngineWrapper.backward changed; stabguard.zero.GuardedEngineWrapper mirrors it")
