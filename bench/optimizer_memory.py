"""Optimizer-state memory: bitsandbytes AdamW8bit vs torch AdamW on a LoRA-shaped parameter set.

Run:  python bench/optimizer_memory.py                 (4 layers of Qwen3-VL-32B's text shape, r=16, CPU)
      python bench/optimizer_memory.py --layers 64 --device cuda    (the full 32B adapter set, 134M params)

The parameter set is what LoRA r on the seven text projections (q, k, v, o, gate, up, down) of a
Qwen3-VL-32B-like decoder trains: an A (r x in) and a B (out x r) matrix per projection and layer.
Both optimizers get identical parameters and gradients, take the same steps, and their state is
measured tensor by tensor (shared quantization maps counted once). bitsandbytes keeps tensors with
fewer than 4096 elements in 32-bit state; the script says how many of those the set has.
Goal: AdamW8bit state <= 0.3x of torch AdamW's.
"""

from __future__ import annotations

import argparse
import time

import torch

from stabguard.plugins.optim8bit import state_bytes

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size


def lora_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, rank: int) -> list[tuple[int, int]]:
    """(rows, cols) of the A and B matrices of one decoder layer's seven adapted projections."""
    q, kv = heads * head_dim, kv_heads * head_dim
    projections = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden),  # q k v o: (in, out)
                   (hidden, ffn), (hidden, ffn), (ffn, hidden)]  # gate up down
    return [shape for fan_in, fan_out in projections for shape in ((rank, fan_in), (fan_out, rank))]


def make_params(shapes: list[tuple[int, int]], layers: int, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        for shape in shapes:
            p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(device))
            p.grad = torch.randn(shape, generator=generator).mul_(1e-3).to(device)
            params.append(p)
    return params


def measure(make_optimizer, params: list[torch.nn.Parameter], steps: int) -> dict:
    optimizer = make_optimizer(params)
    optimizer.step()  # state is created lazily on the first step
    sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    sync()
    n_bytes, n_params = state_bytes(optimizer)
    return {"bytes": n_bytes, "params": n_params, "step_ms": 1000 * (time.perf_counter() - start) / max(steps, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-VL-32B has 64)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=25600)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    import bitsandbytes as bnb

    shapes = lora_shapes(args.hidden, args.heads, args.kv_heads, args.head_dim, args.ffn, args.rank)
    small = sum(r * c < BNB_MIN_8BIT_SIZE for r, c in shapes) * args.layers
    results = {}
    for name, factory in (("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
                          ("bnb AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4))):
        results[name] = measure(factory, make_params(shapes, args.layers, args.device), args.steps)
    report(args, results, small, len(shapes) * args.layers)
    return results


def report(args, results: dict, small: int, tensors: int) -> None:
    base, eight = results["torch AdamW"], results["bnb AdamW8bit"]
    print(f"LoRA r={args.rank} on 7 projections x {args.layers} layers (hidden {args.hidden}, ffn {args.ffn}): "
          f"{base['params']:,} params in {tensors} tensors ({small} under {BNB_MIN_8BIT_SIZE} elements stay "
          f"32-bit in bitsandbytes); device {args.device}")
    print(f"{'optimizer':<16}{'state MiB':>12}{'bytes/param':>14}{'step ms':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['bytes'] / 2**20:>12.2f}{r['bytes'] / r['params']:>14.3f}{r['step_ms']:>10.1f}")
    ratio = eight["bytes"] / base["bytes"]
    print(f"ratio AdamW8bit / AdamW: {ratio:.3f}x (goal <= 0.3x: {'met' if ratio <= 0.3 else 'NOT met'})")
    full = base["params"] // args.layers * 64  # Qwen3-VL-32B has 64 decoder layers
    print(f"at 64 layers of this shape ({full:,} params): AdamW {base['bytes'] / base['params'] * full / 2**30:.2f} GiB, "
          f"AdamW8bit {eight['bytes'] / eight['params'] * full / 2**30:.2f} GiB")

if __name__ == "__main__":
    main()
