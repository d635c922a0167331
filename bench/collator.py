"""Collation cost: building + checking labels (collator labels, mask guard) vs the processor's own work.

Run:  python bench/collator.py                    (the real Qwen BPE: needs the test extra, pip install -e '.[test]')
      python bench/collator.py --tokenizer demo --batches 40 --batch-size 8

The real Qwen BPE is rebuilt offline from the ranks shipped in ``dashscope`` (the ``test`` extra). Without
it the default stops and says so; ``--tokenizer demo`` measures the demo's 2048-token BPE instead (shorter
vocabulary, different token counts: not the numbers in docs/numbers.md). The first line printed names the tokenizer.

Each batch goes through ChatCollator, whose processor is wrapped in a timer, then MaskGuard.post_collate
(strict mode, the default). The processor's own time -- chat-template rendering, tokenization, image
resizing and patching -- is timed inside the same collator call, so the label share is the rest of that
call, measured side by side with no second run. Shares are of process CPU time (robust to other load on
the machine; the tokenizer's own threads count as processor work); tokens/s is wall-clock. Two workloads: PCB-like samples (one 640x640 image at
Qwen's shipped pixel limits = 400 image tokens, 1-2 rounds) and text-only multi-turn chats (the worst
case for the share: no image work to hide behind). Torch runs on one thread, as in a DataLoader worker
(``--threads`` to change). The first batch is a warm-up (and the guard's one-off
"what the loss sees" decode) and is not timed.
Goal: labels + guard <= 5% of collation time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import time

import torch
from PIL import Image

from stabguard import EventLog
from stabguard.collate import ChatCollator
from stabguard.plugins.mask import MaskGuard, Options
from stabguard.qwen import build_demo_tokenizer, build_processor, build_qwen_tokenizer

WORDS = ("trace pad via solder copper short open spur mouse bite pin hole board layer edge crack bridge "
         "resistor capacitor connector chip ground plane near left right top bottom the a of is at").split()
DEFECTS = ("open", "short", "mousebite", "spur", "spurious_copper", "pin_hole")


class TimedProcessor:
    """Forwards to a processor and adds up the CPU seconds spent inside it."""

    def __init__(self, processor):
        self._processor, self.seconds = processor, 0.0

    def _timed(self, fn, *args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - start

    def __call__(self, *args, **kwargs):
        return self._timed(self._processor, *args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self._timed(self._processor.apply_chat_template, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def turn(role: str, text: str, images: int = 0) -> dict:
    items = [{"type": "image", "image": f"board{k}.png"} for k in range(images)]
    return {"role": role, "content": items + [{"type": "text", "text": text}]}


def pcb_sample(rng: random.Random, i: int) -> dict:
    """One board photo, a question, a JSON box answer; sometimes a follow-up round."""
    boxes = [{"bbox_2d": [rng.randrange(600) for _ in range(4)], "label": rng.choice(DEFECTS)} for _ in range(3)]
    messages = [turn("user", "Inspect this PCB. " + words(rng, 12), images=1), turn("assistant", str(boxes))]
    if rng.random() < 0.5:
        messages += [turn("user", "Why? " + words(rng, 8)), turn("assistant", words(rng, 40))]
    shade = rng.randrange(256)
    return {"id": f"pcb:{i}", "messages": messages, "images": [Image.new("RGB", (640, 640), (shade, 120, 40))]}


def text_sample(rng: random.Random, i: int) -> dict:
    """Four rounds of plain text, 60-200 words per reply."""
    messages = [{"role": "system", "content": [{"type": "text", "text": words(rng, 20)}]}]
    for _ in range(4):
        messages += [turn("user", words(rng, rng.randrange(10, 40))), turn("assistant", words(rng, rng.randrange(60, 200)))]
    return {"id": f"text:{i}", "messages": messages, "images": []}


def timed_run(collator, timed: TimedProcessor, guard: MaskGuard, samples: list[dict], events) -> tuple:
    """CPU seconds (processor, labels, guard), wall seconds, tokens for one batch.

    labels = the collator's own time (its call minus the processor inside it)."""
    timed.seconds = 0.0
    wall, start = time.perf_counter(), time.process_time()
    batch = collator(samples)
    middle = time.process_time()
    guard.post_collate(batch=batch, samples=samples, events=events)
    end, wall = time.process_time(), time.perf_counter() - wall
    tokens = int(batch["attention_mask"].sum())
    del batch  # freeing ~80 MB of pixels must not land in the next timing
    gc.collect()
    return timed.seconds, middle - start - timed.seconds, end - middle, wall, tokens


def measure(processor, make, batches: int, batch_size: int, seed: int = 0) -> dict:
    """Totals over the batches, each a fresh one (a rerun would find the tokenizer's caches warm)."""
    rng, timed = random.Random(seed), TimedProcessor(processor)
    collator, guard, events = ChatCollator(timed), MaskGuard(Options(), processor=processor), EventLog()
    totals = {"processor": 0.0, "labels": 0.0, "guard": 0.0, "wall": 0.0, "tokens": 0}
    for b in range(batches + 1):
        samples = [make(rng, b * batch_size + k) for k in range(batch_size)]
        run = timed_run(collator, timed, guard, samples, events)
        if b == 0:
            continue  # warm-up, and the guard's one-off decode of the first batch
        for key, value in zip(("processor", "labels", "guard", "wall", "tokens"), run):
            totals[key] += value
    assert not events.of_kind("finding"), events.of_kind("finding")[:1]
    return totals


def report(name: str, t: dict, goal: float) -> str:
    total = t["processor"] + t["labels"] + t["guard"]
    share = (t["labels"] + t["guard"]) / total
    return (f"{name:<12} {t['tokens'] / t['wall']:>10,.0f} {t['processor'] / total:>10.1%} {t['labels'] / total:>8.2%} "
            f"{t['guard'] / total:>7.2%} {share:>13.2%}  {'ok' if share <= goal else 'OVER'} (goal <= {goal:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", choices=["qwen", "demo"], default=None)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--goal", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kind = args.tokenizer or "qwen"
    if kind == "qwen" and importlib.util.find_spec("dashscope") is None:
        parser.exit(2, "collator: the real Qwen BPE needs dashscope (the test extra: pip install -e '.[test]'); "
                       "or measure the demo tokenizer with --tokenizer demo\n")
    tokenizer = build_qwen_tokenizer() if kind == "qwen" else build_demo_tokenizer()
    processor = build_processor(tokenizer)
    name = {"qwen": "the real Qwen BPE (from dashscope)", "demo": "the demo BPE (not Qwen's)"}[kind]
    print(f"tokenizer: {name}, {len(tokenizer)} tokens; {args.batches} timed batches of {args.batch_size}; "
          f"CPU, {args.threads} torch thread(s)")
    print(f"{'workload':<12} {'tokens/s':>10} {'processor':>10} {'labels':>8} {'guard':>7} {'labels+guard':>13}")
    for name, make in (("pcb-image", pcb_sample), ("text-multi", text_sample)):
        print(report(name, measure(processor, make, args.batches, args.batch_size), args.goal))


if __name__ == "__main__":
    main()
