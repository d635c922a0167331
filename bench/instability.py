"""The instability benchmark: stabguard against the plain Trainer and the peers' own step guards.

    python bench/instability.py            # writes docs/benchmarks.md and docs/benchmarks.png
    python bench/instability.py --only nan-grad,inf-grad --out /tmp/bench.md

Every run trains the same tiny random Qwen3-VL (LoRA r=8 on the text projections, torch AdamW, lr 3e-3
cosine, batch 2 x 2 accumulation, seed 0) on the same 64 synthetic PCB boards, with the same faults
injected from outside at the same steps in every arm: a tensor hook on one LoRA gradient, a forward hook
on ``lm_head``, a wrapper around the collator (after it, before any guard looks), a callback after the
update. Arms (bench/baselines.py says where each peer's behaviour is read from):

- plain: ``transformers.Trainer`` with the engineering note's ``max_grad_norm=0.3`` and
  ``logging_nan_inf_filter=True``;
- ms-swift: the same, plus ms-swift's "NaN grad norm -> every gradient None" patch;
- OLMo-core: the same, with OLMo-core's skip-step AdamW (update x a 0/1 factor from a 6-sigma z-score);
- stabguard: ``GuardTrainer`` with every built-in guard at its defaults, except ``optim8bit`` off (torch
  AdamW in every arm) and the spike window shortened to 8 (min_history 5), as the faults demo does: the
  default window (100 losses, min_history 20) does not fit a 32-step run.

Per run: weights finite at the end, the final loss (mean loss of 8 fixed training samples under the
final weights, no fault) against the same arm's clean run, steps lost (not run, or whose update did not
survive: skipped, rolled back, or leaving non-finite weights), and wall time against the plain arm on the
same scenario (the four arms run next to each other, in rotating order).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import transformers  # noqa: E402

from baselines import FeedSkipStep, SkipStepAdamW, source_note_arguments, swift_nan_norm  # noqa: E402

ARMS = ("plain", "ms-swift", "OLMo-core", "stabguard")
STEPS, ACCUMULATION = 32, 2
DAMAGE_STD = 0.5


@dataclass
class Scenario:
    name: str
    what: str
    grad: dict[int, float] = field(default_factory=dict)  # step -> value put into one LoRA gradient
    logits: tuple[int, ...] = ()     # steps whose first micro-batch gets an Inf logit
    pixels: tuple[int, ...] = ()     # steps whose first micro-batch gets NaN pixels
    poison: tuple[int, ...] = ()     # steps whose first sample gets a random-token answer
    masked: tuple[int, ...] = ()     # steps whose every label is masked
    damage: tuple[int, ...] = ()     # steps after whose update noise is added to every adapter
    training: dict = field(default_factory=dict)
    natural: bool = False


NAN, INF = float("nan"), float("inf")
SCENARIOS = [
    Scenario("clean", "no fault"),
    Scenario("nan-grad", "NaN in one LoRA gradient at step 10", grad={10: NAN}),
    Scenario("inf-grad", "+Inf in one LoRA gradient at step 10", grad={10: INF}),
    Scenario("damage", f"noise (std {DAMAGE_STD}) on every adapter after step 24's update", damage=(24,)),
    Scenario("masked", "every label of step 16 masked (an all-truncated batch)", masked=(16,), natural=True),
    Scenario("nan-x3", "NaN gradient at steps 10, 11, 12", grad={10: NAN, 11: NAN, 12: NAN}),
    Scenario("inf-logits", "+Inf in one logit at step 10", logits=(10,)),
    Scenario("nan-pixels", "NaN pixels (a corrupt image) at step 10", pixels=(10,)),
    Scenario("lr-10x", "lr 3e-2 (10x), no clipping (max_grad_norm 0) in every arm",
             training={"learning_rate": 3e-2, "max_grad_norm": 0.0}, natural=True),
    Scenario("poisoned", "one sample's answer replaced by random tokens, at steps 14 and 22",
             poison=(14, 22), natural=True),
]


# -- faults, injected the same way in every arm -------------------------------------------------------

class Faults(transformers.TrainerCallback):
    """Installs a scenario's faults from outside the trainer: hooks on the model, a collator wrapper,
    this callback. Steps are optimizer steps (1-based); micro-batches are counted per step."""

    def __init__(self, scenario: Scenario, state_of):
        self.s, self.state_of = scenario, state_of  # state_of(): the trainer's TrainerState
        self.collated = 0
        self.micro = {"backward": (0, 0), "forward": (0, 0)}  # kind -> (step, micro-batches seen in it)

    def step(self) -> int:
        return self.state_of().global_step + 1

    def first_micro(self, kind: str) -> bool:
        step, seen = self.micro[kind]
        seen = seen + 1 if step == self.step() else 1
        self.micro[kind] = (self.step(), seen)
        return seen == 1

    def install(self, model) -> None:
        lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad)
        lora_b.register_hook(self.corrupt_grad)
        model.get_output_embeddings().register_forward_hook(self.corrupt_logits)

    def corrupt_grad(self, grad):
        if not self.first_micro("backward") or self.step() not in self.s.grad:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = self.s.grad[self.step()]
        return grad

    def corrupt_logits(self, module, args, output):
        if not module.training or not self.first_micro("forward") or self.step() not in self.s.logits:
            return None
        output = output.clone()
        output[0, -1, 0] = INF
        return output

    def collate(self, batch):
        """Called on each collated micro-batch, in order (the data loader's look-ahead keeps the order)."""
        step, micro = self.collated // ACCUMULATION + 1, self.collated % ACCUMULATION
        self.collated += 1
        if micro == 0 and step in self.s.pixels:
            batch["pixel_values"].fill_(NAN)
        if micro == 0 and step in self.s.poison:
            poison_answer(batch, row=0, seed=step)
        if step in self.s.masked:
            batch["labels"].fill_(-100)
        return batch

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.s.damage:
            generator = torch.Generator().manual_seed(state.global_step)
            with torch.no_grad():
                for p in (p for p in model.parameters() if p.requires_grad):
                    p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * DAMAGE_STD)


def poison_answer(batch, row: int, seed: int) -> None:
    """A wrong answer, not a wrong mask: the supervised tokens (ids and labels alike) become random
    tokens drawn from the batch's answers; the end-of-turn tokens keep their places."""
    labels, ids = batch["labels"][row], batch["input_ids"][row]
    supervised = (labels != -100).nonzero().flatten()
    end = labels[supervised[-1]]
    spots = supervised[labels[supervised] != end]  # every reply's end-of-turn token keeps its place
    words = batch["labels"][batch["labels"] != -100].unique()  # the answers' own token ids ...
    words = words[words != end]  # ... but not the end-of-turn token: a wrong answer, still a well-formed chat
    pick = torch.randint(0, len(words), (len(spots),), generator=torch.Generator().manual_seed(seed))
    labels[spots] = ids[spots] = words[pick]


class FaultyCollator:
    """The real collator, then the scenario's batch faults; everything else forwarded."""

    def __init__(self, collator, faults: Faults):
        self.collator, self.faults = collator, faults

    def __call__(self, samples):
        return self.faults.collate(self.collator(samples))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("collator", "faults"):
            raise AttributeError(name)
        return getattr(self.collator, name)


# -- what each step did to the weights ---------------------------------------------------------------

class Ledger(transformers.TrainerCallback):
    """Per step, a fingerprint of the trainable weights after it: equal to an earlier one means the
    steps since were lost (skipped or rolled back); non-finite means the step left NaN/Inf behind.
    One host sync per step, in every arm alike."""

    def __init__(self):
        self.prints: list[tuple[int, float]] = [(0, NAN)]
        self.lost: set[int] = set()
        self.losses: dict[int, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.prints = [(0, fingerprint(model))]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step, now = state.global_step, fingerprint(model)
        if not torch.isfinite(torch.tensor(now)):
            self.lost.add(step)
        for earlier, value in reversed(self.prints):
            if value == now:
                self.lost.update(range(earlier + 1, step + 1))
                break
        self.prints.append((step, now))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def fingerprint(model) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    return float(torch.stack([p.detach().double().sum() for p in params]).sum())


# -- building the arms ---------------------------------------------------------------------------------

def sections(assets: dict[str, Path], out: Path, scenario: Scenario) -> dict:
    from stabguard.recipe import DataSection, LoraSection, ModelSection

    training = {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": ACCUMULATION, "learning_rate": 3e-3, "warmup_steps": 0.1,
                "lr_scheduler_type": "cosine", "max_grad_norm": source_note_arguments()["max_grad_norm"],
                "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "seed": 0, "report_to": "none",
                "disable_tqdm": True, **scenario.training}
    return {"model": ModelSection(name_or_path=str(assets["model"]), dtype="float32", max_pixels=65536),
            "data": DataSection(train=str(assets["train"]), max_length=512),
            "training": training, "lora": LoraSection(r=8, alpha=16)}


def stabguard_guards(plugins) -> dict:
    """Every built-in guard at its defaults; optim8bit off (torch AdamW everywhere); spike window 8."""
    opts = {name: spec.options() for name, spec in plugins.guards.items()}
    opts["optim8bit"] = plugins.guards["optim8bit"].options(enabled=False)
    opts["spike"] = plugins.guards["spike"].options(window=8, min_history=5)
    return opts


def build_stabguard(parts: dict, recovery: dict | None = None):
    """GuardTrainer as ``stabguard run`` builds it; ``recovery``: its ``[recovery]`` table (default: on)."""
    from stabguard.events import EventLog
    from stabguard.manager import Plugins
    from stabguard.recipe import Recipe, RecoverySection
    from stabguard.runner import build_trainer

    plugins = Plugins.for_recipe(autoload=False)
    recipe = Recipe(**parts, guards=stabguard_guards(plugins), recovery=RecoverySection(**(recovery or {})))
    plugins.enable_guards(recipe.guards)
    events = EventLog(Path(parts["training"]["output_dir"]) / "events.jsonl")
    args = transformers.TrainingArguments(**recipe.training_arguments())
    plugins.hook.configure(recipe=recipe, events=events)
    trainer = build_trainer(recipe, plugins, events, args)
    return trainer, trainer.data_collator, "collator"


def build_plain(parts: dict, arm: str):
    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_model
    from stabguard.recipe import TRAINING_DEFAULTS

    training = {**TRAINING_DEFAULTS, **parts["training"],
                "logging_nan_inf_filter": source_note_arguments()["logging_nan_inf_filter"]}
    args = transformers.TrainingArguments(**training)
    transformers.set_seed(args.seed)
    model, processor = load_model(parts["model"], parts["lora"], None)
    optimizer = None
    if arm == "OLMo-core":
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = SkipStepAdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    collator = ChatCollator(processor, max_length=parts["data"].max_length)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ConversationDataset(parts["data"].train),
                                   data_collator=collator, processing_class=processor,
                                   optimizers=(optimizer, None))
    if arm == "ms-swift":
        swift_nan_norm(trainer.accelerator)
    if arm == "OLMo-core":
        FeedSkipStep(optimizer).attach(model, trainer.accelerator)
    return trainer, trainer, "data_collator"


def build(arm: str, assets: dict[str, Path], out: Path, scenario: Scenario, recovery: dict | None = None):
    """A ready trainer of ``arm`` with the scenario's faults installed; and the ledger."""
    parts = sections(assets, out, scenario)
    trainer, holder, attr = build_stabguard(parts, recovery) if arm == "stabguard" else build_plain(parts, arm)
    faults, ledger = Faults(scenario, lambda: trainer.state), Ledger()
    setattr(holder, attr, FaultyCollator(getattr(holder, attr), faults))  # inside stabguard's hooks
    faults.install(trainer.model)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the log dicts: not needed here
    trainer.add_callback(faults)
    trainer.add_callback(ledger)
    return trainer, ledger


# -- one run ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    arm: str
    scenario: str
    finite: bool
    final_loss: float
    steps_run: int
    lost: int
    wall: float
    outcome: str
    losses: dict[int, float]


def run_one(arm: str, scenario: Scenario, assets: dict[str, Path], out: Path, probe) -> Result:
    transformers.logging.set_verbosity_error()
    trainer, ledger = build(arm, assets, out, scenario)
    return train_and_measure(trainer, ledger, arm, scenario, probe)


def train_and_measure(trainer, ledger: Ledger, arm: str, scenario: Scenario, probe) -> Result:
    """Train to the end (a crash is a result too) and read what the run left: weights, loss, lost steps."""
    start, outcome = time.perf_counter(), "finished"
    try:
        trainer.train()
    except Exception as exc:  # a peer crashing is a result too
        outcome = f"crashed: {type(exc).__name__}"
    wall = time.perf_counter() - start
    if getattr(trainer, "stop_reason", None):
        outcome = f"stopped at step {trainer.state.global_step}"
    model = trainer.model
    finite = all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    steps_run = trainer.state.global_step
    lost = len(ledger.lost) + (STEPS - steps_run)
    return Result(arm, scenario.name, bool(finite), probe(model), steps_run, lost, wall, outcome, ledger.losses)


def make_probe(assets: dict[str, Path], n: int = 8):
    """The mean loss of the first ``n`` training samples (batches of 2) under a model's current weights."""
    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_processor
    from stabguard.recipe import ModelSection

    data = ConversationDataset(assets["train"])
    processor = load_processor(ModelSection(name_or_path=str(assets["model"]), max_pixels=65536))
    collator = ChatCollator(processor, max_length=512)
    batches = [collator([data[i], data[i + 1]]) for i in range(0, n, 2)]

    @torch.no_grad()
    def probe(model) -> float:
        was = model.training
        model.eval()
        losses = [model(**{k: v for k, v in b.items() if torch.is_tensor(v)}).loss for b in batches]
        model.train(was)
        return float(torch.stack(losses).mean())

    return probe


def make_assets(root: Path) -> dict[str, Path]:
    from stabguard.data.synth import synth_pcb
    from stabguard.models import build_tiny_model

    model = build_tiny_model(root / "model", seed=0, max_pixels=65536)
    synth_pcb(root / "data", n=64, seed=0, size=256, val_fraction=0.0)
    return {"model": model, "train": root / "data" / "train.jsonl"}


# -- the whole benchmark -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names (clean is always run)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned: the cores are shared)")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    wanted = set(filter(None, opts.only.split(","))) | {"clean"}
    scenarios = [s for s in SCENARIOS if not opts.only or s.name in wanted]
    arms = opts.arms.split(",")
    began = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="stabguard-instability-") as tmp:
        assets = make_assets(Path(tmp))
        probe = make_probe(assets)
        for i, scenario in enumerate(scenarios):
            order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate: drift hits every arm alike
            for arm in order:
                result = run_one(arm, scenario, assets, Path(tmp) / "out" / f"{scenario.name}-{arm}", probe)
                results.append(result)
                print(f"{scenario.name:<11} {arm:<10} {result.outcome:<22} finite {result.finite!s:<5} "
                      f"loss {result.final_loss:8.4f}  lost {result.lost:2d}  {result.wall:6.1f} s", flush=True)
            # Written after every scenario: a run cut short still leaves the rows it finished.
            write_report(Path(opts.out), results, scenarios[:i + 1], arms, time.perf_counter() - began, opts,
                         missing=[s.name for s in scenarios[i + 1:]])
    total = time.perf_counter() - began
    out = Path(opts.out)
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({total / 60:.1f} min)")
    return 0


def table(results: list[Result], scenarios: list[Scenario], arms: list[str]) -> list[str]:
    by = {(r.scenario, r.arm): r for r in results}
    lines = ["| scenario | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for s in scenarios:
        cells = []
        for arm in arms:
            r, clean = by[(s.name, arm)], by[("clean", arm)]
            cells.append(cell(r, clean, by.get((s.name, "plain"), by[(s.name, arms[0])])))  # speed vs plain
        lines.append(f"| **{s.name}**{' (natural)' if s.natural else ''} | " + " | ".join(cells) + " |")
    return lines


def cell(r: Result, clean: Result, plain: Result) -> str:
    if not r.finite:
        loss = "**NaN weights**"
    else:
        loss = f"{r.final_loss:.3f} ({r.final_loss - clean.final_loss:+.3f})"
    extra = "" if r.outcome == "finished" else f"; {r.outcome}"
    return f"{loss}; lost {r.lost - clean.lost}; x{r.wall / plain.wall:.2f}{extra}"


def write_report(out: Path, results, scenarios, arms, total: float, opts, missing=()) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(out.with_suffix(".png"), results, scenarios, arms)
    text = TEMPLATE.format(
        command="python bench/instability.py" + (f" --only {opts.only}" if opts.only else ""),
        total=total / 60, machine=machine_text(), torch=torch.__version__, transformers=transformers.__version__,
        steps=STEPS, table="\n".join(table(results, scenarios, arms))
        + (f"\n\nNot run (the command was stopped before them): {', '.join(missing)}." if missing else ""),
        scenarios="\n".join(f"| {s.name} | {s.what} |" for s in scenarios), png=out.with_suffix(".png").name)
    kept = re.search(r"<!-- recovery: .*?<!-- /recovery -->", out.read_text(encoding="utf-8"), re.S) \
        if out.exists() else None  # bench/recovery.py's section
    out.write_text(text + (f"\n{kept.group(0)}\n" if kept else ""), encoding="utf-8")


def machine_text() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores (torch {torch.get_num_threads()} threads), "
            f"no GPU, load average {os.getloadavg()[0]:.1f}")


def plot(path: Path, results, scenarios, arms) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.scenario, r.arm): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(scenarios) + 2), gridspec_kw={"width_ratios": [3, 2]})
    grid = [[by[(s.name, a)].final_loss - by[("clean", a)].final_loss if by[(s.name, a)].finite else float("nan")
             for a in arms] for s in scenarios]
    ax = axes[0]
    ax.imshow(torch.tensor(grid).nan_to_num(1.0).clamp(-0.2, 1.0), cmap="RdYlGn_r", vmin=-0.2, vmax=1.0, aspect="auto")
    for i, s in enumerate(scenarios):
        for j, a in enumerate(arms):
            r = by[(s.name, a)]
            lost = r.lost - by[("clean", a)].lost
            ax.text(j, i, "NaN" if not r.finite else f"{grid[i][j]:+.2f}\nlost {lost}", ha="center",
                    va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_yticks(range(len(scenarios)), [s.name for s in scenarios])
    ax.set_title("final loss minus the arm's clean run (red: NaN weights)")
    curve = next((s for s in scenarios if s.name == "damage"), scenarios[-1])
    for a in arms:
        losses = by[(curve.name, a)].losses
        axes[1].plot(list(losses), list(losses.values()), label=a)
    axes[1].set_title(f"training loss per step: {curve.name}")
    axes[1].set_xlabel("optimizer step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TEMPLATE = """# Benchmarks: runs that would have exploded

Generated by `{command}` ({total:.1f} min on {machine}; torch {torch}, transformers {transformers}).
Do not edit by hand: run the command again.

## Instability: stabguard against the plain Trainer and the peers' step guards

The tiny random Qwen3-VL of the demo (LoRA r=8 on the text projections, torch AdamW, lr 3e-3 cosine,
warm-up 10%, batch 2 x 2 accumulation, {steps} optimizer steps, seed 0) on 64 synthetic PCB boards. The same
faults are injected at the same steps in every arm, from outside the trainer (`bench/instability.py`).
Each cell: final loss (mean loss of 8 fixed training samples under the final weights) and, in brackets,
its difference from the same arm's clean run; steps lost (not run, or whose update did not survive:
skipped, rolled back, or leaving non-finite weights; counted beyond the clean run, whose first step
changes nothing at warm-up's lr 0); the wall time of `train()` against the plain arm on the same
scenario (about 2 s a run: noisy; the OLMo-core arm's optimizer is a per-tensor Python loop, as OLMo-core's
is, not torch's fused AdamW).

{table}

![final loss against the clean run, per scenario and arm; training loss of the damage scenario]({png})

| scenario | what is broken |
|---|---|
{scenarios}
| fp16-overflow | not run: needs a GPU (`bench/gpu/selfcheck.sh`) |

The arms (each in a few lines in `bench/baselines.py`, written from the peer's code):

| arm | on a bad step | read from |
|---|---|---|
| plain | nothing: `logging_nan_inf_filter=True` only hides a NaN loss from the log; `max_grad_norm=0.3` (the engineering note's settings) | `transformers/trainer.py` (5.24) |
| ms-swift | patches `Accelerator.clip_grad_norm_`: after clipping, a NaN norm sets every gradient to None (no update); an Inf norm passes; nothing without clipping | `swift/trainers/mixin.py`, `_fix_grad_norm_nan` |
| OLMo-core | skip-step AdamW: decay, moments and update multiplied by a 0/1 factor from a 6-sigma z-score of loss and pre-clip grad norm over the last 128 steps, active after `max(20, 128 // 2)` = 64 losses (never, in a {steps}-step run); a NaN times 0 is NaN | `src/olmo_core/optim/skip_step_optimizer.py`, `src/olmo_core/optim/adamw.py` |
| stabguard | every built-in guard at its defaults: non-finite loss/gradient skips the step (no optimizer, no scheduler step), 3 in a row or a 6-sigma loss spike roll back to the last verified snapshot, clip 0.3 once with the shared norm, the mask audit | `stabguard/step.py`, `plugins/` |

stabguard runs with two settings changed from its defaults, the same in every scenario: `optim8bit`
off, so every arm uses torch AdamW; and the spike window 8 (min_history 5) instead of 100 (20), as
`recipes/pcb_tiny_faults.toml` does, since a {steps}-step run never fills the default window. LLaMA-Factory's
v1 trainer (skips `optimizer.step` on a non-finite norm, still steps the LR scheduler) and torchtitan
(stops the run) are not arms here.

How to read the natural scenarios: *lr-10x* is lr 3e-2 without clipping, on the same LoRA adapters.
On this model Adam normalises the update and the final norm bounds the logits, so a too-high learning
rate may not destabilise anything; the row says what happened. *poisoned* replaces one sample's answer
by tokens drawn at random from the batch's answers (ids and labels alike, so the mask is right and the answer wrong), at two
steps. *masked* masks every label of one optimizer step, what a collator that truncates without
checking gives. With transformers 5.24 the Trainer's loss is then 0 with zero gradients, not NaN, so
the baselines train on; stabguard's `mask` guard (default `policy = "error"`) refuses a batch with no
supervised token and stops the run, saving the last verified state (`policy = "skip_sample"` would drop
it and go on).
"""


if __name__ == "__main__":
    sys.exit(main())
