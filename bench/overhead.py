"""What the gradient guards cost: GuardTrainer with nonfinite, grad_norm (adaptive) and spike versus the
plain ``transformers.Trainer`` with ``max_grad_norm``, same model, data, seed and arguments.

    python bench/overhead.py                 # about 3 minutes on 2 idle CPU cores
    python bench/overhead.py --rounds 9 --steps 20
    python bench/overhead.py --snapshot-every 0   # the guarded arm without the core's per-step snapshot

Torch runs on ``--threads`` threads (default 1; ``OMP_NUM_THREADS`` too, set before torch loads): two
torch processes each taking every core of a 2-core machine oversubscribe it and steps get ~40x slower.

After one untimed run of each, runs alternate (plain, guarded, guarded, plain, ...) so drift in the
machine's load hits both alike.
A step's time is the time between two ``on_step_end`` callbacks (data, forward, backward, norm, guards,
optimizer), as wall time and as this process's CPU time (steadier when other processes share the
cores); the first ``--skip`` steps of every run are dropped. Printed: each trainer's median step time,
their ratio over all steps and the median of each round's ratio (goal <= 1.02), and the passes over the
gradients per optimizer step, counted by wrapping torch's norm and clip-by-norm functions under every
name they are called by (goal: exactly one norm pass).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

def _threads(argv: list[str]) -> str:
    """``--threads N`` read before torch is imported, so its thread pools start at that size."""
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return "1"


os.environ["OMP_NUM_THREADS"] = _threads(sys.argv)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.nn.utils import clip_grad  # noqa: E402

from stabguard.events import EventLog  # noqa: E402
from stabguard.manager import Plugins  # noqa: E402
from stabguard.recipe import DataSection, LoraSection, ModelSection, Recipe, SnapshotSection  # noqa: E402

GUARDS = {"nonfinite": {}, "grad_norm": {"adaptive": True}, "spike": {}}
PASSES: Counter = Counter()
SNAPSHOT_EVERY = [1]  # the recipe default; --snapshot-every


def count_gradient_passes() -> None:
    """Wrap the global-norm passes (torch's, which the plain Trainer runs, and stabguard's, which keeps the
    per-tensor norms of the same kernels) and torch's clip-by-norm under every name they are called by."""
    import stabguard.engine

    norm, ours, scale = clip_grad._get_total_norm, stabguard.engine.grad_norms, clip_grad._clip_grads_with_norm_

    def counted_norm(*args, **kwargs):
        PASSES["norm"] += 1
        return norm(*args, **kwargs)

    def counted_ours(*args, **kwargs):
        PASSES["norm"] += 1
        return ours(*args, **kwargs)

    stabguard.engine.grad_norms = counted_ours

    def counted_scale(*args, **kwargs):
        PASSES["scale"] += 1
        return scale(*args, **kwargs)

    clip_grad._get_total_norm = torch.nn.utils.get_total_norm = counted_norm
    clip_grad._clip_grads_with_norm_ = torch.nn.utils.clip_grads_with_norm_ = counted_scale


class StepClock(transformers.TrainerCallback):
    """(wall, CPU) seconds between consecutive optimizer steps. CPU time (all of this process's threads)
    moves far less than wall time when other processes share the cores."""

    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.process_time())
        if self.last is not None:
            self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


def time_the_seam(trainer, seconds: list[float]) -> None:
    """Time ``_clip_grad_norm``: plain, the norm and the clip; guarded, the norm, every guard's decision,
    the host sync and the clip. Short enough to be rarely preempted, so steadier than a whole step."""
    real = trainer._clip_grad_norm

    def timed(model):
        start = time.perf_counter()
        result = real(model)
        seconds.append(time.perf_counter() - start)
        return result

    trainer._clip_grad_norm = timed


def make_assets(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from stabguard.data.synth import synth_pcb
    from stabguard.models import build_tiny_model

    text = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 32, "num_key_value_heads": hidden // 64, "head_dim": 32}
    model = build_tiny_model(root / "model", seed=0, overrides={"text_config": text}, max_pixels=65536)
    synth_pcb(root / "data", n=16, seed=0, size=256, val_fraction=0.0)
    return model, root / "data" / "train.jsonl"


def make_recipe(model: Path, train: Path, out: Path, steps: int, plugins: Plugins) -> Recipe:
    training = {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2, "learning_rate": 5e-4, "max_grad_norm": 1.0,
                "logging_steps": 5, "save_strategy": "no", "use_cpu": True, "seed": 0, "disable_tqdm": True}
    guards = {name: plugins.guards[name].options(**opts) for name, opts in GUARDS.items()}
    return Recipe(model=ModelSection(name_or_path=str(model), dtype="float32", max_pixels=65536),
                  data=DataSection(train=str(train), max_length=512), training=training,
                  lora=LoraSection(r=8, alpha=16), guards=guards, snapshots=SnapshotSection(every=SNAPSHOT_EVERY[0]))


def guard_plugins() -> Plugins:
    plugins = Plugins()
    for name in GUARDS:
        plugins.load_module(f"stabguard.plugins.{name}", name=name, source="built-in")
    plugins.collect_guards()
    return plugins


def build(kind: str, model: Path, train: Path, out: Path, steps: int):
    """A ready trainer of ``kind`` ("guarded" or "plain") on the same model, data, seed and arguments."""
    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_model
    from stabguard.runner import build_trainer

    plugins = guard_plugins()
    recipe = make_recipe(model, train, out, steps, plugins)
    transformers.set_seed(0)
    if kind == "guarded":
        plugins.enable_guards(recipe.guards)
        args = transformers.TrainingArguments(**recipe.training_arguments())
        return build_trainer(recipe, plugins, EventLog(), args)
    net, processor = load_model(recipe.model, recipe.lora, recipe.quantization)
    collator = ChatCollator(processor, max_length=recipe.data.max_length, truncation=recipe.data.truncation)
    args = transformers.TrainingArguments(**recipe.training_arguments())
    return transformers.Trainer(model=net, args=args, train_dataset=ConversationDataset(train),
                                data_collator=collator, processing_class=processor)


def timed_run(kind: str, model: Path, train: Path, out: Path, steps: int, skip: int) -> tuple[list[tuple], Counter]:
    """Per step after the first ``skip``: (wall, CPU, seam) seconds; and gradient passes per step."""
    gc.collect()  # the previous run's trainer must not be collected inside this run's steps
    trainer = build(kind, model, train, out / kind, steps)
    clock, seam = StepClock(), []
    trainer.add_callback(clock)
    time_the_seam(trainer, seam)
    PASSES.clear()
    trainer.train()
    passes = Counter({k: v / trainer.state.global_step for k, v in PASSES.items()})
    return [(*t, s) for t, s in zip(clock.times, seam[1:])][skip:], passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="pairs of runs (plain + guarded)")
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first step intervals of a run left out")
    parser.add_argument("--hidden", type=int, default=256, help="text hidden size of the random model")
    parser.add_argument("--layers", type=int, default=4, help="text layers of the random model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cores may be shared)")
    parser.add_argument("--snapshot-every", type=int, default=1, help="the guarded arm's [snapshots] every")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    SNAPSHOT_EVERY[0] = opts.snapshot_every
    transformers.logging.set_verbosity_error()
    count_gradient_passes()
    with tempfile.TemporaryDirectory(prefix="stabguard-bench-") as tmp:
        model, train = make_assets(Path(tmp), opts.hidden, opts.layers)
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "guarded": []}
        passes: dict[str, Counter] = {}
        pairs = []  # per round: guarded/plain of the two runs made next to each other
        for kind in ("plain", "guarded"):  # untimed: the first runs in a process are slower, whichever kind
            timed_run(kind, model, train, Path(tmp) / "out", opts.skip + 2, opts.skip)
        for r in range(opts.rounds):
            medians = {}
            for kind in (("plain", "guarded") if r % 2 == 0 else ("guarded", "plain")):
                step_times, passes[kind] = timed_run(kind, model, train, Path(tmp) / "out", opts.steps, opts.skip)
                times[kind] += step_times
                medians[kind] = [statistics.median(t) for t in zip(*step_times)]
                print(f"round {r + 1} {kind:8s} median step: wall {medians[kind][0] * 1e3:7.1f} ms, "
                      f"CPU {medians[kind][1] * 1e3:7.1f} ms", flush=True)
            pairs.append([g / p for g, p in zip(medians["guarded"], medians["plain"])])
    report(times, pairs, passes, opts)
    return 0


def report(times: dict[str, list[tuple[float, float]]], pairs: list[list[float]], passes: dict[str, Counter],
           opts) -> None:
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"model: text hidden {opts.hidden} x {opts.layers} layers, LoRA r=8; batch 2 x 2 accumulation")
    print(f"guards: {', '.join(f'{k} {v}' if v else k for k, v in GUARDS.items())}; snapshots every "
          f"{opts.snapshot_every}; plain: max_grad_norm=1.0")
    seam = {k: statistics.median(t[2] for t in times[k]) for k in ("plain", "guarded")}
    plain_step = statistics.median(t[0] for t in times["plain"])
    print(f"median time in the clipping seam: plain {seam['plain'] * 1e3:.2f} ms (norm, clip), guarded "
          f"{seam['guarded'] * 1e3:.2f} ms (norm, guards, sync, clip): {(seam['guarded'] - seam['plain']) / plain_step:+.2%} "
          f"of a plain step")
    for i, clock in enumerate(("wall", "CPU")):
        plain, guarded = (statistics.median(t[i] for t in times[k]) for k in ("plain", "guarded"))
        print(f"median {clock} step: plain {plain * 1e3:.1f} ms, guarded {guarded * 1e3:.1f} ms "
              f"({len(times['plain'])} steps each); ratio guarded/plain {guarded / plain:.3f}  (goal <= 1.02); "
              f"median of the rounds' ratios {statistics.median(pair[i] for pair in pairs):.3f}")
    for kind in ("plain", "guarded"):
        print(f"passes over the gradients per optimizer step, {kind}: norm {passes[kind]['norm']:g}, "
              f"scale {passes[kind]['scale']:g}  (goal: norm 1)")


if __name__ == "__main__":
    sys.exit(main())
