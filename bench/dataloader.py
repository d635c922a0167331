"""The data path with 0 and 2 loader workers, side by side: how much of each micro-batch the main thread spends.

Run:  python bench/dataloader.py                       (real Qwen BPE when dashscope is installed, else the demo BPE)
      python bench/dataloader.py --batches 24 --step-ms 400

The real pieces of ``stabguard run``: ConversationDataset (images decoded from disk), ChatCollator, the
trainer's collator wrapper (``pre_collate`` where the loader collates) and ``post_collate`` with the mask
guard in the main process, as ``GuardTrainer`` fires it. The model's step is stood in for by a sleep of
``--step-ms`` (on a GPU the forward/backward leaves the CPU free; on these 2 cores a real CPU step would
compete with the workers and measure the machine, not the data path). Synthetic 640x640 PCB boards.

Main-thread time per micro-batch = waiting for the loader (with 0 workers: loading + collating) + the
data hooks, as wall time and as the main thread's CPU time (on 2 cores the workers' refill of the queue
competes with the main thread for a core: the CPU time is what the main thread itself spends). Goals:
with 2 workers at most 20% of the 0-worker time; the mask guard at most 5% of the collation time.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stabguard import EventLog
from stabguard.collate import ChatCollator
from stabguard.data import ConversationDataset
from stabguard.data.synth import synth_pcb
from stabguard.manager import Plugins
from stabguard.qwen import build_demo_tokenizer, build_processor, build_qwen_tokenizer
from stabguard.trainer import COLLATED_KEY, _GuardedCollator


def tokenizer(choice: str):
    if choice == "qwen" or (choice == "auto" and importlib.util.find_spec("dashscope")):
        return "real Qwen BPE (dashscope's qwen.tiktoken)", build_qwen_tokenizer()
    why = "" if choice == "demo" else " (dashscope is not installed: pip install '.[test]' for the real Qwen BPE)"
    return f"demo byte-level BPE{why}", build_demo_tokenizer()


def mask_plugins(processor, events) -> Plugins:
    plugins = Plugins()
    plugins.load_module("stabguard.plugins.mask", name="mask", source="built-in")
    plugins.collect_guards()
    plugins.enable_guards({})
    plugins.hook.setup_model(model=None, processor=processor, recipe=None, events=events)
    return plugins


def measure(dataset, collate, plugins, events, workers: int, batches: int, batch_size: int, step_s: float) -> dict:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers)
    waits, hooks, cpu, frees, start = [], [], [], [], None
    it = iter(loader)
    for i in range(batches + 1):
        c0, t0 = time.thread_time(), time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        collated = batch.pop(COLLATED_KEY)
        plugins.hook.post_collate(batch=collated.cpu_batch, samples=collated.samples, events=events)
        c2, t2 = time.thread_time(), time.perf_counter()
        if i == 0:  # warm-up: worker start-up, the mask guard's one-off decode of the first batch
            start = time.perf_counter()
        else:
            waits.append(t1 - t0)
            hooks.append(t2 - t1)
            cpu.append(c2 - c0)
        # The batch is released here, inside the model's step: with workers that unmaps its shared memory
        # (a few ms on the main thread), the loader's transport cost, not collation's or the guards'.
        t3 = time.perf_counter()
        del batch, collated
        if i:
            frees.append(time.perf_counter() - t3)
        time.sleep(step_s)
    wall = time.perf_counter() - start
    return {"wait": statistics.fmean(waits), "hooks": statistics.fmean(hooks), "cpu": statistics.fmean(cpu),
            "free": statistics.fmean(frees),
            "main": statistics.fmean(w + h for w, h in zip(waits, hooks)), "samples_s": batches * batch_size / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=400.0, help="the stand-in for the model's step")
    parser.add_argument("--tokenizer", choices=("auto", "qwen", "demo"), default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker; two torch processes on 2 cores must not oversubscribe

    which, tok = tokenizer(args.tokenizer)
    processor = build_processor(tok, min_pixels=640 * 640, max_pixels=640 * 640)
    with tempfile.TemporaryDirectory() as tmp:
        n = (args.batches + 1) * args.batch_size
        print(f"generating {n} synthetic 640x640 boards ...", flush=True)
        synth_pcb(Path(tmp), n=n, seed=0, size=640, val_fraction=0)
        events = EventLog()
        plugins = mask_plugins(processor, events)
        dataset = ConversationDataset(Path(tmp) / "train.jsonl")
        collate = _GuardedCollator(ChatCollator(processor, max_length=None), plugins, events,
                                   failed=lambda exc, step, samples: None)
        rows = {w: measure(dataset, collate, plugins, events, w, args.batches, args.batch_size, args.step_ms / 1000)
                for w in (0, 2)}
    print(f"tokenizer: {which}; {args.batches} micro-batches of {args.batch_size} boards, step stand-in "
          f"{args.step_ms:.0f} ms, torch threads 1")
    print(f"{'workers':>8} {'samples/s':>10} {'main thread wall ms':>20} {'waiting':>8} {'data hooks':>11} "
          f"{'main thread CPU ms':>19} {'release ms':>11}")
    for w, r in rows.items():
        print(f"{w:>8} {r['samples_s']:>10.2f} {1000 * r['main']:>20.1f} {1000 * r['wait']:>8.1f} "
              f"{1000 * r['hooks']:>11.2f} {1000 * r['cpu']:>19.1f} {1000 * r['free']:>11.2f}")
    print("main-thread time per micro-batch, 2 workers / 0 workers: "
          f"CPU {rows[2]['cpu'] / rows[0]['cpu']:.3f}, wall {rows[2]['main'] / rows[0]['main']:.3f} (goal <= 0.20; "
          "wall includes the workers taking the main thread's core on a 2-core machine)")
    mask_share = rows[0]["hooks"] / rows[0]["wait"]
    print(f"mask guard (post_collate) / loading + collation with 0 workers: {100 * mask_share:.1f}% (goal <= 5%)")


if __name__ == "__main__":
    main()
