"""The engines on one GPU, through the Trainer, with a NaN gradient: one table. NOT RUN ON A GPU YET
(written without one). The FSDP2 row's code was smoke-run on 2 CPU ranks with accelerate's CPU gate
lifted and use_cpu added (SKIP at the fault step, LR held, weights finite). The guarded steps themselves
are tested on 2 CPU ranks through the Trainer: FSDP2 in tests/test_fsdp.py, ZeRO-1/2/3 (fp32 and bf16)
in tests/test_deepspeed.py.

usage: python bench/gpu/engines.py [--out /tmp/stabguard-engines] [--steps 6] [--fault-step 3]

Each row is one ``torchrun --nproc-per-node 1`` process (world size 1, bf16, the tiny Qwen3-VL):
- fsdp2, zero2, zero3 / stabguard: ``stabguard.runner.run`` with the engine in ``[training]``; expected:
  the fault step is SKIPped, every weight finite, the LR held for that step;
- zero2, zero3 / plain Trainer: the same fault without guards, to see what DeepSpeed does with it in
  bf16 (on this CPU with DeepSpeed 0.19.8 it skips the step itself: its norm check sees the NaN).
Rows whose engine is missing (deepspeed not installed) say so. Exits 2 at once without a CUDA GPU;
``STABGUARD_ENGINES_ON_CPU=1`` runs the DeepSpeed rows on the CPU instead (``use_cpu``), to check the
script itself.
About 1-2 minutes per row on an H100 (most of it process start-up and imports); the whole under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = [("fsdp2", "stabguard"), ("zero2", "stabguard"), ("zero2", "plain"), ("zero3", "stabguard"),
        ("zero3", "plain")]
ROW_TIMEOUT_S = 90  # 5 rows: at most 7.5 minutes


def ds_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def training(out: Path, engine: str, steps: int) -> dict:
    base = {"output_dir": str(out / "run"), "max_steps": steps, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "logging_steps": 1,
            "max_grad_norm": 1.0, "bf16": True, "seed": 0, "report_to": "none", "remove_unused_columns": False,
            "save_strategy": "no"}
    if os.environ.get("STABGUARD_ENGINES_ON_CPU"):  # a smoke run of this script itself (DeepSpeed rows only)
        base["use_cpu"] = True
    if engine == "fsdp2":
        # SHARDED: with FULL_STATE_DICT the final save_model of a peft model failed on CPU (FSDP2, 2 ranks)
        return {**base, "fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}
    return {**base, "deepspeed": ds_config(int(engine[-1]))}


# -- one row, inside torchrun ----------------------------------------------------------------------

def all_finite(model) -> bool:
    import torch

    from stabguard import engine

    finite = True
    for p in model.parameters():
        if p.requires_grad:
            t = engine.local(p)
            try:  # DeepSpeed keeps the fp32 master copy apart (ZeRO-3: p itself is an empty shell)
                from deepspeed.utils import safe_get_full_fp32_param

                t = safe_get_full_fp32_param(p) if t.numel() == 0 or hasattr(p, "_hp_mapping") else t
            except Exception:  # noqa: BLE001 - not DeepSpeed
                pass
            finite &= t is None or bool(torch.isfinite(t.float()).all())
    return finite


def recipe_text(model_dir: Path, train: Path) -> str:
    return (f'[model]\nname_or_path = "{model_dir}"\ndtype = "bfloat16"\nmax_pixels = 65536\n\n'
            f'[data]\ntrain = "{train}"\nmax_length = 512\n\n[lora]\nr = 4\nalpha = 8\n\n')


def row(engine: str, trainer_kind: str, out: Path, steps: int, fault_step: int) -> dict:
    import transformers
    from transformers import TrainerCallback

    from stabguard import hookimpl
    from stabguard.manager import Plugins

    out.mkdir(parents=True, exist_ok=True)
    args_dict = training(out, engine, steps)
    result = {"engine": engine, "trainer": trainer_kind, "lrs": {}, "verdicts": {}}
    from stabguard.testing import GradFault

    # A NaN in the backward pass at the first LoRA B output: a hook on the parameter would never fire once
    # DeepSpeed partitions it.
    fault = GradFault(at={fault_step}, value=float("nan"), where="output")
    if trainer_kind == "stabguard":
        from stabguard.runner import run

        class Probe:
            @hookimpl
            def setup_model(self, model):
                fault.setup_model(model)

            @hookimpl(trylast=True)
            def on_step_end(self, state):
                result["verdicts"][state.step] = state.verdict.action.name
                result["lrs"][state.step] = state.optimizer.param_groups[0]["lr"]

        plugins = Plugins()
        for name in ("nonfinite", "grad_norm"):
            plugins.load_module(f"stabguard.plugins.{name}", name=name, source="built-in")
        plugins.register(Probe(), name="probe")
        plugins.collect_guards()
        text = recipe_text(out.parent / "model", out.parent / "data" / "train.jsonl") + "[training]\n" + "\n".join(
            f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}" for k, v in args_dict.items()) + "\n"
        (out / "recipe.toml").write_text(text)
        trainer = run(out / "recipe.toml", plugins=plugins).trainer
        losses = [h.get("loss") for h in trainer.state.log_history if "loss" in h]
        result.update(status="ran", finite=all_finite(trainer.model_wrapped if trainer.is_deepspeed_enabled
                                                      else trainer.model), last_loss=losses[-1] if losses else None)
        return result
    recipe = load_recipe_without_engine(out)
    targs = transformers.TrainingArguments(**args_dict)
    model, processor, train, collator = build(recipe)
    fault.setup_model(model)

    class Lr(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            result["lrs"][state.global_step] = optimizer.param_groups[0]["lr"] if optimizer else None

    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                                   processing_class=processor, callbacks=[Lr()])
    trainer.train()
    losses = [h.get("loss") for h in trainer.state.log_history if "loss" in h]
    return {**result, "status": "ran", "finite": all_finite(trainer.model_wrapped),
            "last_loss": losses[-1] if losses else None}


def _inline(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}" for k, v in d.items()) + " }"


def load_recipe_without_engine(out: Path):
    from stabguard.recipe import load_recipe

    path = out / "base.toml"
    path.write_text(recipe_text(out.parent / "model", out.parent / "data" / "train.jsonl")
                    + f'[training]\noutput_dir = "{out / "run"}"\n')
    return load_recipe(path)


def build(recipe):
    from stabguard.collate import ChatCollator
    from stabguard.data import ConversationDataset
    from stabguard.models import load_model

    model, processor = load_model(recipe.model, recipe.lora, recipe.quantization)
    collator = ChatCollator(processor, max_length=recipe.data.max_length)
    return model, processor, ConversationDataset(recipe.data.train), collator


def worker(engine: str, trainer_kind: str, out: str, steps: str, fault_step: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        result = row(engine, trainer_kind, out_dir, int(steps), int(fault_step))
    except ImportError as exc:
        result = {"engine": engine, "trainer": trainer_kind, "status": f"engine missing: {exc}"}
    result["seconds"] = round(time.monotonic() - start, 1)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))


# -- the table -------------------------------------------------------------------------------------

def prepare(out: Path) -> None:
    from stabguard.data.synth import synth_pcb
    from stabguard.models import build_tiny_model

    if not (out / "model" / "config.json").exists():
        build_tiny_model(out / "model", seed=0, max_pixels=65536)
    if not (out / "data" / "train.jsonl").exists():
        synth_pcb(out / "data", n=16, seed=0, size=128, val_fraction=0.0)


def launch(out: Path, engine: str, kind: str, steps: int, fault_step: int) -> dict:
    row_dir = out / f"{engine}-{kind}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", __file__,
           "--worker", engine, kind, str(row_dir), str(steps), str(fault_step)]
    env = {**os.environ, "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "trainer": kind, "status": f"TIMEOUT after {ROW_TIMEOUT_S}s"}
    path = row_dir / "result.json"
    if proc.returncode != 0 or not path.exists():
        (out / f"{engine}-{kind}.log").write_text(proc.stdout + proc.stderr)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"engine": engine, "trainer": kind, "status": f"FAILED rc={proc.returncode}: {last[:90]}"}
    return json.loads(path.read_text())


def describe(r: dict, fault_step: int) -> list[str]:
    lrs = {int(k): v for k, v in r.get("lrs", {}).items()}
    held = "-"
    if fault_step in lrs and fault_step - 1 in lrs:
        held = "yes" if lrs[fault_step] == lrs[fault_step - 1] else "no"
    verdict = r.get("verdicts", {}).get(str(fault_step)) or r.get("verdicts", {}).get(fault_step) or "-"
    finite = {True: "yes", False: "NO", None: "-"}[r.get("finite")]
    loss = r.get("last_loss")
    loss = "-" if loss is None else ("nan" if isinstance(loss, float) and math.isnan(loss) else f"{loss:.3f}")
    status = r["status"] + (f" ({r['message']})" if r.get("message") else "")
    return [r["engine"], r["trainer"], status, verdict, finite, held, loss, str(r.get("seconds", "-"))]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/stabguard-engines")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--fault-step", type=int, default=3)
    opts = parser.parse_args()
    import torch

    on_cpu = bool(os.environ.get("STABGUARD_ENGINES_ON_CPU"))
    if not torch.cuda.is_available() and not on_cpu:
        print("bench/gpu/engines.py: no CUDA GPU here; nothing was run (the FSDP2 step is tested on CPU "
              "by tests/test_fsdp.py)", file=sys.stderr)
        return 2
    out = Path(opts.out)
    prepare(out)
    header = ["engine", "trainer", "status", f"verdict@{opts.fault_step}", "weights finite",
              "LR held", "last loss", "s"]
    # On the CPU (a smoke run of this script) only DeepSpeed runs as it is: FSDP2 needs an accelerator.
    chosen = [(e, k) for e, k in ROWS if not (on_cpu and e == "fsdp2")]
    rows = [describe(launch(out, e, k, opts.steps, opts.fault_step), opts.fault_step) for e, k in chosen]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(x.ljust(w) for x, w in zip(line, widths)))
    where = "CPU smoke run (STABGUARD_ENGINES_ON_CPU)" if on_cpu else f"GPU: {torch.cuda.get_device_name(0)}"
    print(f"{where}; torch {torch.__version__}; NaN gradient at step {opts.fault_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
