"""The GPU self-check's checks; run through ``bench/gpu/selfcheck.sh`` (it checks for a GPU first).

Every model has random weights from a real architecture's shape (nothing is downloaded): the demo's
tiny Qwen3-VL; a Qwen3-VL-2B-shaped one (text 2048 x 28 layers, vision 1024 x 24 blocks, with the demo
tokenizer's 2k vocabulary instead of 151k); a Qwen3-8B-shaped text stack (4096 x 36 layers). Each check
is one row of the table printed at the end; a check that raises is a FAIL row with its exception, and
the others still run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from overhead import StepClock  # noqa: E402

ROWS: list[tuple[str, str, str, float]] = []
FAULTS = {"nan_grad_at": [8], "grad_scale_at": [14], "damage_at": [18]}  # recipes/pcb_tiny_faults.toml
QWEN3VL_2B = {"text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
              "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                                "deepstack_visual_indexes": [5, 11, 17]}}
QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}


def check(name: str):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                ok, detail = fn(*args)
            except Exception as exc:  # one broken check must not hide the others
                traceback.print_exc()
                ok, detail = False, f"{type(exc).__name__}: {str(exc)[:160]}"
            ROWS.append((name, "ok" if ok else "FAIL", detail, time.perf_counter() - start))
            torch.cuda.empty_cache()
            print(f"selfcheck: {name}: {'ok' if ok else 'FAIL'} ({detail})", flush=True)
        return run
    return wrap


# -- guarded runs through stabguard's own path ------------------------------------------------------------

def guarded_run(model: Path, train: Path, out: Path, *, steps: int, faults: dict, dtype: str = "bfloat16",
                four_bit: bool = False, paged: bool = False):
    from stabguard.events import EventLog
    from stabguard.manager import Plugins
    from stabguard.recipe import DataSection, LoraSection, ModelSection, QuantizationSection, Recipe
    from stabguard.runner import build_trainer

    plugins = Plugins.for_recipe(["stabguard.faults"], autoload=False)
    guards = {name: spec.options() for name, spec in plugins.guards.items()}
    guards["optim8bit"] = plugins.guards["optim8bit"].options(paged=paged)
    guards["spike"] = plugins.guards["spike"].options(window=8, min_history=5)
    guards["faults"] = plugins.guards["faults"].options(**faults)
    training = {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "warmup_steps": 0.1,
                "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "logging_steps": 2, "save_strategy": "no",
                "seed": 0, "bf16": True, "disable_tqdm": True}
    recipe = Recipe(model=ModelSection(name_or_path=str(model), dtype=dtype, max_pixels=65536),
                    data=DataSection(train=str(train), max_length=512), training=training,
                    lora=LoraSection(r=8, alpha=16), quantization=QuantizationSection(load_in_4bit=four_bit),
                    guards=guards)
    plugins.enable_guards(recipe.guards)
    events = EventLog(out / "events.jsonl")
    args = transformers.TrainingArguments(**recipe.training_arguments())
    plugins.hook.configure(recipe=recipe, events=events)
    trainer = build_trainer(recipe, plugins, events, args)
    trainer.train()
    return trainer


def outcome(trainer) -> tuple[bool, str]:
    """Finished, every trainable weight finite, the NaN step skipped, the damage rolled back."""
    finite = all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
    rollbacks = trainer.guarded.rollbacks
    ok = finite and trainer.stop_reason is None and trainer.skipped_steps >= 1
    return ok, (f"{trainer.state.global_step} steps, weights finite: {finite}, skipped {trainer.skipped_steps}, "
                f"rollbacks {rollbacks}, stop: {trainer.stop_reason or 'none'}, "
                f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


@check("tiny Qwen3-VL, bf16, the faults demo's faults")
def tiny_bf16(root: Path):
    from stabguard.models import build_tiny_model

    model = build_tiny_model(root / "tiny", seed=0, max_pixels=65536)
    trainer = guarded_run(model, root / "data" / "train.jsonl", root / "out-tiny", steps=24, faults=FAULTS)
    ok, detail = outcome(trainer)
    return ok and trainer.guarded.rollbacks >= 1, detail


def build_2b(root: Path) -> Path:
    """Random Qwen3-VL-2B-shaped weights, made on the GPU in bf16 and saved like a checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration

    from stabguard.models import tiny_config
    from stabguard.qwen import build_demo_tokenizer, build_processor

    out = root / "qwen3vl-2b-shaped"
    tokenizer = build_demo_tokenizer()
    config = tiny_config(tokenizer, **QWEN3VL_2B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_processor(tokenizer, max_pixels=65536).save_pretrained(out)
    del model
    return out


@check("2B-shaped Qwen3-VL, bf16 LoRA, NaN gradient at step 3")
def two_b_bf16(root: Path, model: Path):
    torch.cuda.reset_peak_memory_stats()
    trainer = guarded_run(model, root / "data" / "train.jsonl", root / "out-2b", steps=6,
                          faults={"nan_grad_at": [3]})
    return outcome(trainer)


@check("2B-shaped Qwen3-VL, 4-bit QLoRA (bitsandbytes CUDA), paged AdamW8bit, NaN at step 3")
def two_b_qlora(root: Path, model: Path):
    import bitsandbytes as bnb

    torch.cuda.reset_peak_memory_stats()
    trainer = guarded_run(model, root / "data" / "train.jsonl", root / "out-qlora", steps=6,
                          faults={"nan_grad_at": [3]}, four_bit=True, paged=True)
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    optimizer = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
    ok, detail = outcome(trainer)
    return ok and four_bit > 0 and "Paged" in optimizer, f"{four_bit} Linear4bit, {optimizer}; {detail}"


@check("2B-shaped Qwen3-VL, bf16 LoRA: stabguard check --probe (activation maxima, peak memory vs estimate)")
def two_b_probe(root: Path, model: Path):
    from stabguard.check import preflight
    from stabguard.testing import tiny_recipe, write_recipe

    recipe = tiny_recipe({"model": model, "train": root / "data" / "train.jsonl"}, root / "out-probe",
                         training={"use_cpu": False, "bf16": True, "per_device_train_batch_size": 2})
    recipe["model"]["dtype"] = "bfloat16"
    report = preflight(write_recipe(root / "probe.toml", recipe), probe_batches=2, gpu_mem=80)
    found = {f.check: f for f in report.findings if f.check.startswith("probe")}
    step, acts = found.get("probe: step"), found.get("probe: activations")
    if step is None or acts is None:
        return False, "; ".join(f"{f.check}: {f.message}" for f in found.values())[:300]
    peak = (step.values["peak_bytes"] or 0) / 2**30
    estimate = (report.memory or {}).get("total_gib")
    problems = [f"{f.check}: {f.message}" for f in found.values() if f.level == "error"]
    return not problems and peak > 0, (f"{acts.message[:110]}; peak {peak:.2f} GiB, check's estimate "
                                       f"{estimate:.2f} GiB; step {step.values['seconds']:.2f} s"
                                       + (f"; {problems}" if problems else ""))


# -- the step-time ratio on an 8B-shaped text stack --------------------------------------------------------

class TokenRows(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (n, length), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"id": f"row:{i}", "input_ids": self.rows[i], "labels": self.rows[i]}


def stack(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "labels")}


def text_trainer(kind: str, model, data, out: Path, steps: int):
    from stabguard.events import EventLog
    from stabguard.manager import Plugins
    from stabguard.trainer import GuardTrainer

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=1e-4, max_grad_norm=1.0, bf16=True, save_strategy="no", report_to="none",
        logging_steps=100, disable_tqdm=True, remove_unused_columns=False, seed=0,
        logging_nan_inf_filter=kind == "plain")
    common = {"model": model, "args": args, "train_dataset": data, "data_collator": stack}
    if kind == "plain":
        return transformers.Trainer(**common)
    plugins = Plugins.for_recipe(autoload=False, builtins=False)
    for name in ("nonfinite", "grad_norm", "spike"):
        plugins.load_module(f"stabguard.plugins.{name}", name=name, source="built-in")
    plugins.collect_guards()
    plugins.enable_guards({"grad_norm": plugins.guards["grad_norm"].options(adaptive=True)})
    return GuardTrainer(**common, plugins=plugins, events=EventLog())


@check("8B-shaped text stack (LoRA r=16, bf16, 4 x 512 tokens): guarded/plain step time")
def step_ratio(root: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Qwen3ForCausalLM(Qwen3Config(**QWEN3_8B)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj", "gate_proj", "up_proj",
                                                                                 "down_proj"]))
    data = TokenRows(64, 512, QWEN3_8B["vocab_size"])
    medians = {"plain": [], "guarded": []}
    for kind in ("plain", "guarded", "guarded", "plain"):
        trainer = text_trainer(kind, model, data, root / "out-8b", steps=10)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        medians[kind].append(statistics.median(t[0] for t in clock.times[3:]))
    plain, guarded = (statistics.median(v) for v in medians.values())
    return guarded / plain <= 1.05, f"plain {plain * 1e3:.0f} ms, guarded {guarded * 1e3:.0f} ms: x{guarded / plain:.3f}"


def main() -> int:
    from stabguard.data.synth import synth_pcb

    transformers.logging.set_verbosity_error()
    name = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="stabguard-selfcheck-") as tmp:
        root = Path(tmp)
        synth_pcb(root / "data", n=64, seed=0, size=256, val_fraction=0.0)
        tiny_bf16(root)
        try:
            model_2b = build_2b(root)
        except Exception as exc:
            ROWS.append(("2B-shaped Qwen3-VL: build", "FAIL", f"{type(exc).__name__}: {exc}"[:160], 0.0))
        else:
            two_b_bf16(root, model_2b)
            two_b_qlora(root, model_2b)
            two_b_probe(root, model_2b)
        step_ratio(root)
    print(f"\n{name}; torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}")
    print("| check | result | detail | s |\n|---|---|---|---|")
    for row in ROWS:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.0f} |")
    return 0 if all(r[1] == "ok" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
