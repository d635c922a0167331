"""``stabguard eval``: score a trained PCB inspector from the answers it generates on the val split.

A falling loss says the model fits its data, not that it finds defects. So each val image gets one
fixed detection prompt, the model answers greedily, and :mod:`stabguard.scoring` parses and scores the
answers against the row's ``defects``. The model is loaded as training loaded it (the recipe's dtype
and quantization) plus the LoRA adapter the run saved in ``output_dir`` -- or without the adapter
(``untrained``), the comparison that says whether training taught anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stabguard.scoring import PROMPT, EvalError, result_record, summarize, truth_of

__all__ = ["PROMPT", "EvalError", "evaluate", "find_adapter", "generate_answers", "load_for_eval"]


def find_adapter(output_dir: str | Path) -> Path:
    """The run's final adapter (``output_dir``), else its newest ``checkpoint-N`` (a stopped run)."""
    out = Path(output_dir)
    if (out / "adapter_config.json").is_file():
        return out
    steps = [p for p in out.glob("checkpoint-*") if (p / "adapter_config.json").is_file() and p.name[11:].isdigit()]
    if steps:
        return max(steps, key=lambda p: int(p.name[11:]))
    raise EvalError(f"{out}: no LoRA adapter (adapter_config.json) there or in a checkpoint-N folder; train first "
                    "with `stabguard run RECIPE`, pass --adapter DIR, or score the base model with --untrained")


def load_for_eval(recipe: Any, *, untrained: bool = False, adapter: str | Path | None = None) -> tuple[Any, Any, str]:
    """(model in eval mode, processor, what was loaded, in words)."""
    import torch

    from stabguard.models import load_model, peft_quietly

    model_section, described = recipe.model, f"untrained base model {recipe.model.name_or_path}"
    full = not untrained and not recipe.lora.enabled  # full fine-tuning saved the whole model in output_dir
    if full:
        out = Path(adapter or recipe.training["output_dir"])
        if not (out / "config.json").is_file():
            raise EvalError(f"{out}: no trained model (config.json) here; train first with `stabguard run RECIPE`")
        model_section = recipe.model.model_copy(update={"name_or_path": str(out), "tiny": None})
        described = f"fine-tuned model {out}"
    model, processor = load_model(model_section, None, recipe.quantization)
    if not untrained and not full:
        from peft import PeftModel

        path = find_adapter(adapter or recipe.training["output_dir"])
        with peft_quietly():
            model = PeftModel.from_pretrained(model, str(path))
        if not recipe.quantization.load_in_4bit:  # merged: same outputs, no adapter overhead per token
            model = model.merge_and_unload()
        described = f"{recipe.model.name_or_path} + LoRA adapter {path}"
    if torch.cuda.is_available() and not recipe.quantization.load_in_4bit:
        model = model.to("cuda")
    return model.eval(), processor, described


def _prompt_messages(n_images: int, prompt: str) -> list[dict]:
    content = [{"type": "image", "image": f"image-{k}"} for k in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def generate_answers(model: Any, processor: Any, samples: list[dict], prompt: str = PROMPT,
                     max_new_tokens: int = 256) -> list[str]:
    """Greedy answers to ``prompt`` about each sample's images, one left-padded batch."""
    import torch

    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(_prompt_messages(len(s["images"]), prompt), tokenize=False,
                                           add_generation_prompt=True) for s in samples]
    images = [image for s in samples for image in s["images"]]
    inputs = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def eval_rows(path: str | Path, limit: int | None,
              progress: Any = None) -> tuple[Any, list[tuple[int, list[dict]]], list[str]]:
    """(dataset, [(row index, ground truth)], ids of rows without ground truth)."""
    from stabguard.data import ConversationDataset

    dataset, chosen, skipped = ConversationDataset(path, progress=progress), [], []
    for i, (_, row) in enumerate(dataset.rows):
        truth = truth_of(row, dataset.sample_id(i))
        if truth is None:
            skipped.append(dataset.sample_id(i))
        elif limit is None or len(chosen) < limit:
            chosen.append((i, truth))
    if not chosen:
        raise EvalError(f"{path}: no row with ground truth (a `defects` key, or an assistant reply "
                        "'Found k defects: [...]' / 'No defects found.') to score against")
    return dataset, chosen, skipped


def evaluate(recipe_path: str | Path, *, untrained: bool = False, adapter: str | Path | None = None,
             data: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 256, prompt: str = PROMPT, out: str | Path | None = None,
             progress: Any = None) -> dict:
    """Generate, parse and score; write the result (metrics, settings, every answer) as JSON.

    ``out`` defaults to ``<output_dir>/eval.json`` (``eval_untrained.json`` with ``untrained``);
    ``progress(what, done, total)`` (see :mod:`stabguard.progress`) hears of each batch answered.
    """
    from stabguard.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    path = data or recipe.data.val
    if not path:
        raise EvalError(f"{recipe_path}: data.val is not set; add it to the recipe or pass --data FILE.jsonl")
    dataset, chosen, skipped = eval_rows(path, limit, progress)
    model, processor, described = load_for_eval(recipe, untrained=untrained, adapter=adapter)
    scores, records = [], []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        samples = [dataset[i] for i, _ in part]
        answers = generate_answers(model, processor, samples, prompt, max_new_tokens)
        for sample, (_, truth), answer in zip(samples, part, answers):
            score, record = result_record(sample["id"], answer, truth)
            scores.append(score)
            records.append(record)
        if progress:
            progress("answers generated", len(records), len(chosen))
    result = {"recipe": str(recipe_path), "model": described, "untrained": untrained, "data": str(path),
              "prompt": prompt, "max_new_tokens": max_new_tokens, "metrics": summarize(scores),
              "without_ground_truth": skipped, "samples": records,
              # A tiny random model (the CPU demo) scores 0 whatever its training; the CLI says so.
              "random_tiny_model": recipe.model.tiny is not None,
              "parameters": sum(p.numel() for p in model.parameters())}
    target = Path(out) if out else Path(recipe.training["output_dir"]) / ("eval_untrained.json" if untrained else "eval.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    result["written"] = str(target)
    return result
