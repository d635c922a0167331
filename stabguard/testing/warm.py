"""A warm tiny Qwen3-VL: the random tiny model after a short deterministic warm-up on the synthetic boards.

A random-weight model predicts every answer equally badly, so a poisoned answer or a too-high learning
rate changes nothing it can show. After :data:`WARM_STEPS` full fine-tuning steps (about 35 s on 2 CPU
cores) it has learned the answer format ("Yes: 3 defects." and the JSON list; loss about 7.2 -> 0.5), and
natural troubles show as they do on a real model. Built once and cached by the hash of everything that
goes into it (the random model's weights, the data, the warm-up settings, the torch and transformers
versions): ``$STABGUARD_CACHE`` (default ``~/.cache/stabguard``) ``/warm/<hash>``. Never committed.

    from stabguard.testing.warm import warm_tiny_assets
    assets = warm_tiny_assets()      # {"model": folder, "train": train.jsonl}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

WARM_STEPS, WARM_LR, WARM_BATCH, WARM_SEED = 300, 3e-3, 4, 0
BOARDS = {"n": 64, "seed": 0, "size": 256, "val_fraction": 0.0}


def cache_root() -> Path:
    return Path(os.environ.get("STABGUARD_CACHE", Path.home() / ".cache" / "stabguard"))


def warm_tiny_assets(cache: str | Path | None = None) -> dict[str, Path]:
    """The warm model folder (weights and processor) and its training data, built on first use."""
    import torch
    import transformers

    from stabguard.data.synth import synth_pcb
    from stabguard.models import build_tiny_model

    root = Path(cache) if cache is not None else cache_root() / "warm"
    with tempfile.TemporaryDirectory(prefix="stabguard-warm-", dir=_made(root)) as tmp:
        cold = build_tiny_model(Path(tmp) / "model", seed=0, max_pixels=65536)
        synth_pcb(Path(tmp) / "data", **BOARDS)
        settings = {"steps": WARM_STEPS, "lr": WARM_LR, "batch": WARM_BATCH, "seed": WARM_SEED, "boards": BOARDS,
                    "torch": torch.__version__, "transformers": transformers.__version__}
        key = content_hash([*sorted(cold.rglob("*.safetensors")), Path(tmp) / "data" / "train.jsonl"], settings)
        home = root / key
        if not (home / "warm.json").is_file():
            _warm_up(cold, Path(tmp) / "data" / "train.jsonl", settings)
            shutil.rmtree(home, ignore_errors=True)
            os.replace(tmp, home)  # the whole folder at once: a killed warm-up leaves no half model
            Path(tmp).mkdir()  # for TemporaryDirectory's clean-up
    return {"model": home / "model", "train": home / "data" / "train.jsonl"}


def content_hash(files: list[Path], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _made(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def _warm_up(model_dir: Path, train: Path, settings: dict) -> None:
    """Full fine-tuning, one thread, fixed seeds: the same inputs give the same warm weights."""
    import torch
    import transformers

    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_processor
    from stabguard.recipe import ModelSection

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.set_seed(WARM_SEED)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    collator = ChatCollator(load_processor(ModelSection(name_or_path=str(model_dir), max_pixels=65536)), max_length=512)
    data = ConversationDataset(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_LR, weight_decay=0.0)
    order = torch.Generator().manual_seed(WARM_SEED)
    began, losses = time.perf_counter(), []
    model.train()
    for step in range(1, WARM_STEPS + 1):
        rows = torch.randint(0, len(data), (WARM_BATCH,), generator=order).tolist()
        batch = {k: v for k, v in collator([data[i] for i in rows]).items() if torch.is_tensor(v)}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"stabguard: warm-up step {step}/{WARM_STEPS}: loss {sum(losses[-50:]) / 50:.3f}",
                  file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    model.save_pretrained(model_dir)
    summary = {**settings, "first_loss": losses[0], "last_50_loss": sum(losses[-50:]) / 50,
               "seconds": round(time.perf_counter() - began, 1)}
    (model_dir.parent / "warm.json").write_text(json.dumps(summary, indent=1))
