"""Data loading in worker processes: every data guard still sees every micro-batch, in the main process.

Collation (and ``pre_collate``) runs in the loader workers; ``post_collate`` fires in the main process on
the batch's CPU tensors before the model sees it; what happens in a worker (a truncation drop, a row
skipped for its image) reaches events.jsonl with its sample.
"""

from __future__ import annotations

import os

from click.testing import CliRunner
from support import tiny_recipe, write_recipe
from support_faults import StepProbe, run_guarded

from stabguard import hookimpl
from stabguard.cli import main
from stabguard.data.synth import synth_pcb
from stabguard.events import read_events

DECISIONS = ("finding", "skip", "drop", "alert", "rollback", "stop", "error", "skipped_row")


class MainProcessProbe:
    """Which process fired post_collate, and for which samples."""

    def __init__(self):
        self.pids, self.ids = set(), []

    @hookimpl
    def post_collate(self, samples):
        self.pids.add(os.getpid())
        self.ids.append([s["id"] for s in samples])


def guarded_run(tmp_path, tiny_assets, workers: int):
    probe, steps = MainProcessProbe(), StepProbe()
    folder = tmp_path / f"workers{workers}"
    folder.mkdir()
    # max_length 90 truncates every sample and drops the one whose reply starts past token 90.
    recipe_data = {"max_length": 90}
    result, _ = run_guarded(folder, tiny_assets, probe, steps, enabled=("mask", "nonfinite", "grad_norm"),
                            training={"max_steps": 3, "per_device_train_batch_size": 2,
                                      "dataloader_num_workers": workers},
                            guards={"mask": {"policy": "warn"}}, data=recipe_data)
    events = [(e["guard"], e["kind"], e["step"], e["message"]) for e in read_events(result.output_dir / "events.jsonl")
              if e["kind"] in DECISIONS]
    return result, probe, steps, events


def test_the_data_guards_act_identically_with_0_and_2_workers(tmp_path, tiny_assets):
    inline, inline_probe, inline_steps, inline_events = guarded_run(tmp_path, tiny_assets, 0)
    pooled, pooled_probe, pooled_steps, pooled_events = guarded_run(tmp_path, tiny_assets, 2)
    assert inline.ok and pooled.ok
    assert pooled_probe.pids == {os.getpid()}, "post_collate fires in the main process"
    assert pooled_probe.ids == inline_probe.ids, "the same micro-batches, with the same samples"
    assert any(kind == "drop" for _, kind, _, _ in pooled_events), "the worker's truncation drop is in the log"
    assert sorted(pooled_events) == sorted(inline_events)
    assert pooled_steps.losses == inline_steps.losses and pooled_steps.norms == inline_steps.norms


def test_a_corrupt_image_seen_in_a_worker_is_reported_with_its_file_and_line(tmp_path, tiny_assets):
    synth_pcb(tmp_path / "data", n=6, seed=3, size=128, val_fraction=0)
    train = tmp_path / "data" / "train.jsonl"
    second_image = train.read_text().splitlines()[1].split('"image": "')[1].split('"')[0]
    (tmp_path / "data" / second_image).write_bytes(b"not a png")
    recipe = tiny_recipe({**tiny_assets, "train": train}, tmp_path / "out",
                         training={"max_steps": 6, "dataloader_num_workers": 2})  # every row is read
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.toml", recipe))])
    assert result.exit_code == 1, result.output
    refused = next(line for line in result.output.splitlines() if "stabguard: refused:" in line)
    assert f"{train}:2" in refused and second_image in refused and "Traceback" not in refused

    recipe["data"]["bad_rows"] = "skip"
    recipe["training"]["output_dir"] = str(tmp_path / "skip")
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.toml", recipe))])
    assert result.exit_code == 0, result.output
    skipped = [e for e in read_events(tmp_path / "skip" / "events.jsonl") if e["kind"] == "skipped_row"]
    assert skipped and skipped[0]["values"]["sample"] == f"{train}:2" and second_image in skipped[0]["message"]


def test_collated_samples_carry_no_decoded_images():
    from stabguard.trainer import _without_images

    sample = {"id": "a:1", "messages": [], "images": [object(), object()]}
    assert _without_images(sample) == {"id": "a:1", "messages": [], "n_images": 2}


class StepSamples:
    """The samples the core attributes to each optimizer step."""

    def __init__(self):
        self.by_step = {}

    @hookimpl
    def pre_step(self, state):
        self.by_step[state.step] = list(state.samples)


def test_each_step_knows_its_samples_with_workers_and_evaluation_in_between(tmp_path, tiny_assets):
    probe = StepSamples()
    result, _ = run_guarded(tmp_path, tiny_assets, probe, enabled=("nonfinite",),
                            training={"max_steps": 6, "dataloader_num_workers": 2, "eval_strategy": "steps",
                                      "eval_steps": 2, "per_device_eval_batch_size": 2},
                            data={"val": str(tiny_assets["val"])})
    assert result.ok and sorted(probe.by_step) == [1, 2, 3, 4, 5, 6]
    trained = [i for ids in probe.by_step.values() for i in ids]
    assert all(len(ids) == 1 for ids in probe.by_step.values()), "batch size 1: one sample a step"
    train_ids = {f"{tiny_assets['train']}:{n}" for n in range(1, 7)}
    assert set(trained) == train_ids, "every training row once; no evaluation sample counted as trained"
