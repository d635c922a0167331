"""``stabguard eval RECIPE``: score the trained model (or, with --untrained, the base) on the val split.

Exit codes: 0 when scored (however low the scores), 2 when the recipe, the data or the adapter is
missing or invalid -- each message names the file and what to do.
"""

from __future__ import annotations

import json
import sys

import click

EXIT_INPUT = 2
METRICS = (  # (key, label) in the order printed
    ("answers_parsed", "answers in the format"),
    ("count_accuracy", "count accuracy"),
    ("type_accuracy", "defect-type accuracy"),
    ("box_iou", "mean box IoU (greedy)"),
    ("precision_50", "precision @ IoU 0.5"),
    ("recall_50", "recall @ IoU 0.5"),
)


def _value(value: float | None, as_percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if as_percent else f"{value:.3f}"


def render(result: dict, examples: int = 2) -> str:
    """The metrics as a table, then a few raw answers (so a score of 0 shows *why*)."""
    m = result["metrics"]
    lines = [f"stabguard eval: {result['model']}",
             f"  on {result['data']}: {m['samples']} samples, greedy, at most {result['max_new_tokens']} new tokens",
             "", f"  {'metric':<24}{'value':>9}", f"  {'-' * 24}{'-' * 9}"]
    lines += [f"  {label:<24}{_value(m[key], key != 'box_iou'):>9}" for key, label in METRICS]
    if result["without_ground_truth"]:
        lines.append(f"  ({len(result['without_ground_truth'])} rows without ground truth not scored)")
    for record in result["samples"][:examples]:
        lines.append(f"  e.g. {record['id']}: {record['answer'][:100]!r}")
    lines.append(f"  written to {result['written']}")
    if result.get("random_tiny_model"):
        lines.append(tiny_model_note(result.get("parameters")))
    return "\n".join(lines)


def tiny_model_note(parameters: int | None) -> str:
    size = f"{parameters / 1e6:.2f}M-parameter " if parameters else ""
    return (f"  note: this recipe's model is a {size}random tiny Qwen3-VL (model.tiny), built to exercise the "
            "pipeline on a CPU, not to read boards: 0% is its expected score, trained or not. Scores mean "
            "something with a real checkpoint, e.g. recipes/pcb_qwen3vl.toml.")


@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--untrained", is_flag=True, help="score the base model without the trained adapter (the baseline)")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="adapter folder; default: the recipe's output_dir, else its newest checkpoint-N")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="JSONL to score instead of data.val")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="score only the first N rows")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="answer length cap; 3 boxes take ~100 tokens with the Qwen tokenizer")
@click.option("--prompt", default=None, help="the detection instruction; default: the synthetic sets' first one")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="result file; default: <output_dir>/eval.json (eval_untrained.json with --untrained)")
@click.option("--json", "as_json", is_flag=True, help="print the whole result as JSON")
def command(recipe, untrained, adapter, data, limit, batch_size, max_new_tokens, prompt, out, as_json):
    """Generate answers on the val split and score defect types, counts and boxes."""
    from stabguard.cli.validate import report_recipe_error
    from stabguard.data import DataError
    from stabguard.eval import PROMPT, EvalError, evaluate
    from stabguard.progress import command_progress
    from stabguard.recipe import RecipeError

    try:
        with command_progress("no result written") as progress:
            result = evaluate(recipe, untrained=untrained, adapter=adapter, data=data, limit=limit,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, prompt=prompt or PROMPT,
                              out=out, progress=progress)
    except RecipeError as exc:
        report_recipe_error(exc)
        sys.exit(EXIT_INPUT)
    except (EvalError, DataError) as exc:
        click.echo(f"stabguard eval: {exc}", err=True)
        sys.exit(EXIT_INPUT)
    click.echo(json.dumps(result, indent=1) if as_json else render(result))
