"""Recovery on a warm model: where today's stabguard STOPs, does the healing one finish, and how well?

    python bench/recovery.py             # writes its section of docs/benchmarks.md
    python bench/recovery.py --lrs 3e-2,1e-1,3e-1 --out /tmp/bench.md

The model is the warm tiny Qwen3-VL (``stabguard.testing.warm``: the random tiny model after a 300-step
deterministic warm-up on the 64 synthetic boards, cached by content hash): it has learned the answer
format, so a poisoned answer and a too-high learning rate hurt it as they hurt a real model. On it, the
same LoRA fine-tune as ``bench/instability.py`` (r=8, torch AdamW, lr 3e-3 cosine, batch 2 x 2
accumulation, seed 0), for 96 optimizer steps (6 epochs), in five arms: the plain Trainer, ms-swift's and
OLMo-core's step guards (``bench/baselines.py``), stabguard as it stopped before recovery (``[recovery]
enabled = false``) and stabguard with its default recovery. Both stabguard arms use the spike window 8
(min_history 5) and torch AdamW, as in ``bench/instability.py``.

Scenarios (every one natural but ``damage-x4``, which is a fault injected after the update):

- ``poisoned``: one sample's last answer replaced by 200 random characters in the data file itself: the
  same sample, every epoch;
- ``poison-batch``: a sample that damages its whole micro-batch, every time it is in one (a forward hook
  pushes the logits of every row of that batch, as packing without per-sample attention, MoE capacity
  dropping or a padding blow-up do): its neighbours' losses rise with it;
- ``transient``: a one-off spike at steps 30 and 60 (the first micro-batch's logits pushed in its training
  forward only): nothing in the data or the weights reproduces it;
- ``lr-NNN``: the learning rate raised, clipping off (``max_grad_norm = 0``) in every arm; each rate of
  ``--lrs`` is run, as a search for one that diverges on its own;
- ``damage-x4``: noise (std 0.5) on every adapter after the updates of steps 20, 35, 50 and 65.

Per run: the final loss (mean loss of 8 fixed clean training samples) against the same arm's clean run,
steps lost (beyond the clean run's), remedies applied, and how the run ended.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import instability  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from instability import Result, Scenario, make_probe  # noqa: E402

ARMS = ("plain", "ms-swift", "OLMo-core", "stabguard, no recovery", "stabguard")
STEPS = 96
POISONED_LINE = 7
POISON_BATCH_LINE = 12
PUSH = 50.0  # how far the poison-batch and transient faults push the logits (about the loss they add)
instability.STEPS = STEPS  # sections() and the lost-step count of instability's helpers read it


def scenarios(lrs: list[float]) -> list[Scenario]:
    found = [Scenario("clean", "no fault"),
             Scenario("poisoned", f"line {POISONED_LINE}'s last answer is 200 random characters (every epoch)",
                      natural=True),
             Scenario("poison-batch", f"line {POISON_BATCH_LINE} pushes the logits of every row of its "
                      "micro-batch (every epoch)"),
             Scenario("transient", "a one-off logit push in the training forward of steps 30 and 60"),
             Scenario("damage-x4", "noise (std 0.5) on every adapter after steps 20, 35, 50, 65",
                      damage=(20, 35, 50, 65))]
    found += [Scenario(f"lr-{lr:g}", f"lr {lr:g} ({lr / 3e-3:g}x), no clipping (max_grad_norm 0)",
                       training={"learning_rate": lr, "max_grad_norm": 0.0}, natural=True) for lr in lrs]
    return found


def poisoned_copy(train: Path, folder: Path) -> Path:
    """The training file with one sample's last answer replaced by random characters (its images linked)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "images").exists():
        (folder / "images").symlink_to(train.parent / "images")
    rows = train.read_text(encoding="utf-8").splitlines()
    row = json.loads(rows[POISONED_LINE - 1])
    garbage = random.Random(0)
    row["messages"][-1]["content"] = "".join(garbage.choice(string.ascii_letters + string.digits + " ")
                                             for _ in range(200))
    rows[POISONED_LINE - 1] = json.dumps(row)
    out = folder / "train.jsonl"
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def build(arm: str, assets: dict[str, Path], out: Path, scenario: Scenario, recovery: dict):
    """instability.build; the two stabguard arms told apart by their ``[recovery]``."""
    if arm.startswith("stabguard"):
        return instability.build("stabguard", assets, out, scenario, {**recovery, "enabled": arm == "stabguard"})
    return instability.build(arm, assets, out, scenario)


class Push:
    """A forward hook on the model: the logits of the chosen rows pushed towards the last token (never a
    target), the loss recomputed. ``poison``: rows told by their tokens (a replay is hit as training
    was); ``steps``: the first training forward of those optimizer steps only (a one-off)."""

    def __init__(self, trainer, poison: set[int] = frozenset(), steps: tuple[int, ...] = ()):
        self.trainer, self.poison, self.steps, self.done = trainer, poison, steps, set()

    def __call__(self, module, args, kwargs, output):
        from stabguard.faults import _causal_loss, _fingerprint, _mask

        ids = kwargs.get("input_ids")
        step = self.trainer.state.global_step + 1
        once = module.training and torch.is_grad_enabled() and step in self.steps and step not in self.done
        hit = any(_fingerprint(r, m) in self.poison for r, m in zip(ids, _mask(kwargs, ids))) if self.poison else once
        if not hit:
            return None
        self.done.add(step)
        push = torch.zeros_like(output.logits)
        push[:, :, -1] = PUSH
        output.logits = output.logits + push
        if kwargs.get("labels") is not None:
            output.loss = _causal_loss(output.logits, kwargs["labels"], kwargs.get("num_items_in_batch"))
        return output


def fingerprint_of(trainer, line: int) -> int:
    """The tokens of the training sample on ``line``, as a collated row (what Push recognises)."""
    from stabguard.collate import ChatCollator
    from stabguard.faults import _fingerprint

    processor = trainer.processing_class
    row = ChatCollator(processor, max_length=4096)([trainer.train_dataset[line - 1]])
    return _fingerprint(row["input_ids"][0], row["attention_mask"][0])


def run_one(arm: str, scenario: Scenario, assets: dict[str, Path], out: Path, probe,
            recovery: dict) -> tuple[Result, list[str], int]:
    transformers.logging.set_verbosity_error()
    trainer, ledger = build(arm, assets, out, scenario, recovery)
    if scenario.name == "poison-batch":
        trainer.model.register_forward_hook(Push(trainer, {fingerprint_of(trainer, POISON_BATCH_LINE)}),
                                            with_kwargs=True)
    if scenario.name == "transient":
        trainer.model.register_forward_hook(Push(trainer, steps=(30, 60)), with_kwargs=True)
    result = instability.train_and_measure(trainer, ledger, arm, scenario, probe)
    if not arm.startswith("stabguard"):
        return result, [], 0
    remedies = [f"{e['values']['remedy']}@{e['step']}" for e in trainer.events.of_kind("remedy")
                if e["values"]["remedy"] != "cool_down_end"]
    culprit = {"poisoned": POISONED_LINE, "poison-batch": POISON_BATCH_LINE}.get(scenario.name)
    innocent = [s for s in trainer.guarded.recovery.quarantined if s != f"{assets['train']}:{culprit}"]
    return result, remedies, len(innocent)


def cell(r: Result, clean: Result, remedies: list[str], innocent: int | None) -> str:
    loss = "**NaN weights**" if not r.finite else f"{r.final_loss:.3f} ({r.final_loss - clean.final_loss:+.3f})"
    healed = f"; remedies: {', '.join(remedies)}" if remedies else ""
    blamed = f"; innocent quarantined: {innocent}" if innocent is not None else ""
    ended = "" if r.outcome == "finished" else f"; **{r.outcome}**"
    return f"{loss}; lost {r.lost - clean.lost}{healed}{blamed}{ended}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", default="3e-2,1e-1,3e-1", help="learning rates to try (clipping off)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (clean is always run)")
    parser.add_argument("--recovery", default="{}", help="the healing arm's [recovery] as JSON, e.g. "
                        "'{\"remedies\": [\"cool_down\"]}' (default: stabguard's defaults)")
    parser.add_argument("--arms", default=";".join(ARMS), help="arms to run, separated by ';' (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    from stabguard.testing.warm import warm_tiny_assets

    began = time.perf_counter()
    warm = warm_tiny_assets()
    found = scenarios([float(x) for x in opts.lrs.split(",") if x])
    wanted = set(filter(None, opts.only.split(","))) | {"clean"}
    found = [s for s in found if not opts.only or s.name in wanted]
    rows: list[tuple[Scenario, dict]] = []
    with tempfile.TemporaryDirectory(prefix="stabguard-recovery-") as tmp:
        poisoned = {**warm, "train": poisoned_copy(warm["train"], Path(tmp) / "poisoned")}
        probe = make_probe(warm)
        clean: dict[str, Result] = {}
        for scenario in found:
            assets = poisoned if scenario.name == "poisoned" else warm
            cells = {}
            for arm in [a for a in ARMS if a in opts.arms.split(";")]:
                out = Path(tmp) / "out" / f"{scenario.name}-{arm.replace(', ', '-').replace(' ', '')}"
                result, remedies, innocent = run_one(arm, scenario, assets, out, probe, json.loads(opts.recovery))
                clean.setdefault(arm, result)
                cells[arm] = cell(result, clean[arm], remedies, innocent if arm.startswith("stabguard") else None)
                print(f"{scenario.name:<12} {arm:<24} {result.outcome:<20} loss {result.final_loss:8.4f} "
                      f"lost {result.lost:3d} innocent {innocent} {' '.join(remedies)}", flush=True)
            rows.append((scenario, cells))
    warmed = json.loads((warm["model"].parent / "warm.json").read_text())
    section = report(rows, time.perf_counter() - began, opts, warmed)
    write_section(Path(opts.out), section)
    print(f"\nwrote the recovery section of {opts.out} ({(time.perf_counter() - began) / 60:.1f} min)")
    return 0


def report(rows, total: float, opts, warm: dict) -> str:
    arms = [a for a in ARMS if a in rows[0][1]]
    lines = ["| scenario | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    lines += [f"| **{s.name}**{' (natural)' if s.natural else ''} | " + " | ".join(c[a] for a in arms) + " |"
              for s, c in rows]
    lines += ["", "| scenario | what is wrong |", "|---|---|"] + [f"| {s.name} | {s.what} |" for s, _ in rows]
    command = "python bench/recovery.py" + (f" --lrs {opts.lrs}" if opts.lrs != "3e-2,1e-1,3e-1" else "") \
        + (f" --recovery '{opts.recovery}'" if opts.recovery != "{}" else "") \
        + (f" --arms '{opts.arms}'" if opts.arms != ";".join(ARMS) else "")
    return RECOVERY.format(command=command + (f" --only {opts.only}" if opts.only else ""), total=total / 60,
                           machine=instability.machine_text(), torch=torch.__version__,
                           transformers=transformers.__version__, steps=STEPS, table="\n".join(lines),
                           warm_steps=warm["steps"], first=warm["first_loss"], last=warm["last_50_loss"],
                           seconds=warm["seconds"])


BEGIN, END = "<!-- recovery: written by bench/recovery.py -->", "<!-- /recovery -->"


def write_section(out: Path, section: str) -> None:
    """Replace this benchmark's section of ``out`` (bench/instability.py keeps it when it rewrites the rest)."""
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    out.write_text(text, encoding="utf-8")


RECOVERY = """## Recovery on a warm model: diagnose, then heal

Generated by `{command}` ({total:.1f} min on {machine}; torch {torch}, transformers {transformers}).

The warm tiny Qwen3-VL (`stabguard.testing.warm`: {warm_steps} full fine-tuning steps on the 64 boards,
loss {first:.2f} -> {last:.2f}, {seconds:.0f} s, cached by content hash), then a LoRA fine-tune for {steps} optimizer
steps in every arm. Each cell: final loss (mean loss of 8 fixed clean training samples) and, in brackets,
its difference from the same arm's clean run; steps lost beyond the clean run's (skipped, rolled back, not
run, or leaving non-finite weights); the remedies applied (name@step); for the stabguard arms, how many
samples were quarantined that are not the scenario's culprit ("innocent quarantined"); and how the run
ended when it did not finish. "stabguard, no recovery" is stabguard with `[recovery] enabled = false`;
"stabguard" has its default recovery: every rejected step replayed, remedies chosen by the evidence
(budget 3 remedies per 500 steps), and the divergence guard on.

{table}

How to read it: the clean run loses its first step in every arm (warm-up's learning rate is 0 there). A
poisoned sample, a sample that damages its micro-batch, a one-off spike and damaging updates show as loss
spikes on the warm model; without recovery the spike guard rolls back three times and stops, saving the
last verified state. With it, each rejected step is replayed first: the poisoned sample and the batch's
culprit are high on their own and only they are quarantined; a one-off or a damaged update is gone on
replay (a transient: the rollback undoes it). The `lr-*` rows raise the learning rate with clipping off in
every arm: a rate whose loss is high from the first steps never looks like a spike, but the divergence
guard sees the loss stay far above where the run started, and the recovery rewinds to an earlier verified
state with the rate cut below the one where the loss first went high. `--recovery` sets the healing arm's
`[recovery]` table (JSON) to try another policy; `--arms` and `--only` run a part of the table.
"""


if __name__ == "__main__":
    raise SystemExit(main())
