"""What the checkpoint manifest costs a save: a 32B-LoRA-sized adapter and its AdamW state, saved as the
Trainer saves them, with and without ``stabguard.checkpoints.write_manifest``, side by side in one run.

Run:  python bench/checkpoint_manifest.py                 (the full r=16 adapter of Qwen3-VL-32B: 1.6 GB)
      python bench/checkpoint_manifest.py --layers 8      (an eighth of it, for a quick look)

The adapter is LoRA r on the seven text projections of Qwen3-VL-32B's decoder (hidden 5120, 64 heads, 8 KV
heads of 128, FFN 25600, 64 layers: ``bench/optimizer_memory.py``'s shapes), fp32 as PEFT keeps it:
134,217,728 parameters, 537 MB in ``adapter_model.safetensors``; AdamW's two fp32 moments, 1.07 GB in
``optimizer.pt``. A "save" is ``safetensors.save_file`` plus ``torch.save`` (the Trainer's two big writes,
without fsync, as the Trainer does); the manifest reads the files back (from the page cache) and hashes
them. "Durable" is the commit when ``save_total_limit`` deletes a checkpoint next: every file fsynced
first, which waits for the disk to take what the save left in the page cache (``os.sync()`` before each
timed save, so none pays for the one before). Also: the time to verify on resume, and each hash a manifest could name (XXH3-128, used; the standard
library's BLAKE2b and SHA-256) on the same files: why XXH3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from optimizer_memory import lora_shapes  # same folder: run as a script
from safetensors.torch import save_file

from stabguard.checkpoints import HASH, HASHES, file_hash, verify, write_manifest

QWEN3_VL_32B = {"hidden": 5120, "heads": 64, "kv_heads": 8, "head_dim": 128, "ffn": 25600}


def adapter_and_moments(layers: int, rank: int) -> tuple[dict, dict]:
    """The adapter's tensors (random fp32) and an AdamW state dict of two moments per tensor."""
    shapes = lora_shapes(**QWEN3_VL_32B, rank=rank)
    generator = torch.Generator().manual_seed(0)
    adapter = {f"layers.{i}.lora.{j}": torch.randn(s, generator=generator)
               for i in range(layers) for j, s in enumerate(shapes)}
    state = {k: {"step": torch.tensor(10.0), "exp_avg": torch.randn(t.shape, generator=generator),
                 "exp_avg_sq": torch.rand(t.shape, generator=generator)} for k, t in enumerate(adapter.values())}
    return adapter, {"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}


def save(folder: Path, adapter: dict, optimizer: dict) -> float:
    start = time.perf_counter()
    folder.mkdir()
    save_file(adapter, folder / "adapter_model.safetensors")
    torch.save(optimizer, folder / "optimizer.pt")
    return time.perf_counter() - start


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def hash_rate(paths: list[Path], name: str) -> float:
    """GB/s of one hash over the saved files (in the page cache: the hash is the cost)."""
    total = sum(p.stat().st_size for p in paths)
    seconds = sum(timed(lambda p=p: file_hash(p, name)) for p in paths)
    return total / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64, help="decoder layers adapted (64: all of Qwen3-VL-32B)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="saves of each kind; medians are shown")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    adapter, optimizer = adapter_and_moments(args.layers, args.rank)
    root = Path(tempfile.mkdtemp(prefix="manifest-bench-", dir=args.dir))
    times: dict[str, list[float]] = {"plain": [], "manifest": [], "durable": [], "verify": []}
    try:
        for i in range(args.rounds):
            for kind in ("plain", "manifest", "durable"):
                os.sync()  # each save starts with nothing of the one before left to write back
                folder = root / f"{kind}-{i}"
                times[kind].append(save(folder, adapter, optimizer))
                if kind != "plain":
                    times[kind][-1] += timed(write_manifest, folder, durable=kind == "durable")
            times["verify"].append(timed(verify, root / f"manifest-{i}"))
            for kind in ("plain", "manifest", "durable"):
                shutil.rmtree(root / f"{kind}-{i}")
        save(root / "files", adapter, optimizer)
        report(args, adapter, sorted((root / "files").iterdir()), times)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(args, adapter: dict, files: list[Path], times: dict[str, list[float]]) -> None:
    params = sum(t.numel() for t in adapter.values())
    sizes = {p.name: p.stat().st_size for p in files}
    print(f"adapter: LoRA r={args.rank} on {args.layers} layers of Qwen3-VL-32B's text projections, "
          f"{params:,} fp32 parameters")
    for name, size in sizes.items():
        print(f"  {name:28} {size / 1e9:6.3f} GB")
    print(f"  {'total':28} {sum(sizes.values()) / 1e9:6.3f} GB")
    median = {kind: statistics.median(t) for kind, t in times.items()}
    plain = median["plain"]
    print(f"{'save, no manifest (the Trainer alone)':50} {plain:6.2f} s   (median of {args.rounds})")
    for kind, label in (("manifest", "save + manifest"), ("durable", "save + manifest, durable (rotation next)")):
        print(f"{label:50} {median[kind]:6.2f} s   ratio {median[kind] / plain:.2f}x, +{median[kind] - plain:.2f} s")
    print(f"{'verify on resume':50} {median['verify']:6.2f} s")
    for name in HASHES:  # the one used and the standard library's two, each a manifest could name
        label = f"hash {name} ({'used' if name == HASH else 'stdlib'})"
        print(f"{label:50} {hash_rate(files, name):6.2f} GB/s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
