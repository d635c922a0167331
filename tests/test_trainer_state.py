"""Reading a run folder: the Trainer's NaN tokens, a file rewritten mid-read, checkpoints, events, args."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import threading
import zipfile

import pytest
from support_runs import hf_log_line, hf_trainer_state, spiky_history, write_events, write_hf_run

from stabguard.trainer_state import (
    TrainerStateError,
    TrainerStateReader,
    find_trainer_state,
    load_run,
    parse_trainer_state,
    read_trainer_state,
    training_arg,
)


def nonfinite_history():
    return [hf_log_line(1, loss=2.0, grad_norm=0.5, lr=1e-4, epoch=0.1),
            hf_log_line(2, loss=math.nan, grad_norm=math.inf, lr=1e-4, epoch=0.2),
            hf_log_line(3, loss=0.0, grad_norm=-math.inf, lr=1e-4, epoch=0.3)]


def test_bare_nan_and_infinity_tokens_are_read(tmp_path):
    text = hf_trainer_state(nonfinite_history(), max_steps=3)
    assert '"loss": NaN' in text and '"grad_norm": Infinity' in text and '"grad_norm": -Infinity' in text
    with pytest.raises(ValueError):  # a strict JSON reader refuses them
        json.loads(text, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
    (tmp_path / "trainer_state.json").write_text(text)
    run = load_run(tmp_path)
    assert [e["step"] for e in run.history] == [1, 2, 3]
    assert math.isnan(run.history[1]["loss"]) and run.history[1]["grad_norm"] == math.inf
    assert run.history[2]["grad_norm"] == -math.inf
    assert run.events == [] and run.global_step == 3 and run.max_steps == 3


def test_summary_and_eval_lines_are_not_training_history(tmp_path):
    history = spiky_history(steps=20, every=5) + [{"eval_loss": 1.0, "step": 20, "epoch": 1.0}]
    write_hf_run(tmp_path, history, max_steps=20, finished=True)
    run = load_run(tmp_path)
    assert len(run.history) == 4 and all("eval_loss" not in e for e in run.history)
    assert run.summary["train_runtime"] == 123.4 and run.finished


def test_parse_errors_name_the_file_and_position(tmp_path):
    path = tmp_path / "trainer_state.json"
    with pytest.raises(TrainerStateError, match=r"trainer_state.json: not valid JSON at line 2"):
        parse_trainer_state('{\n "log_history": [', path)
    with pytest.raises(TrainerStateError, match="empty"):
        parse_trainer_state("  ", path)
    with pytest.raises(TrainerStateError, match="expected an object with a log_history list"):
        parse_trainer_state('{"log_history": 3}', path)


def test_no_state_names_the_folder(tmp_path):
    with pytest.raises(TrainerStateError, match=f"{tmp_path}: no trainer_state.json"):
        load_run(tmp_path)


def test_newest_checkpoint_state_is_the_current_one(tmp_path):
    """While training, only checkpoint-N/ folders hold a state; the newest written one wins."""
    history = spiky_history(steps=40, every=5)
    write_hf_run(tmp_path, history[:4], max_steps=40, checkpoint=20, finished=False)
    write_hf_run(tmp_path, history[:2], max_steps=40, checkpoint=10, finished=False)
    os.utime(tmp_path / "checkpoint-10" / "trainer_state.json", (1_000, 1_000))
    os.utime(tmp_path / "checkpoint-20" / "trainer_state.json", (1_100, 1_100))
    assert find_trainer_state(tmp_path) == tmp_path / "checkpoint-20" / "trainer_state.json"
    run = load_run(tmp_path)
    assert run.global_step == 20 and not run.finished
    assert run.step_times == [(10, 1_000.0), (20, 1_100.0)]


def test_checkpoint_folder_reads_the_runs_events(tmp_path):
    write_hf_run(tmp_path, spiky_history(steps=20, every=5), max_steps=20, checkpoint=20)
    write_events(tmp_path, [("nonfinite", "skip", 7, "step 7 skipped: non-finite gradients", {})])
    run = load_run(tmp_path / "checkpoint-20")
    assert [e["step"] for e in run.events_of("skip")] == [7]


def test_a_file_being_rewritten_is_retried(tmp_path):
    """The Trainer rewrites trainer_state.json in place: a reader can see it empty or cut short."""
    path = tmp_path / "trainer_state.json"
    full = hf_trainer_state(nonfinite_history(), max_steps=3)
    path.write_text(full[: len(full) // 2])
    writer = threading.Timer(0.15, path.write_text, args=(full,))
    writer.start()
    try:
        source, state = read_trainer_state(tmp_path, retries=200, delay=0.05)  # up to 10 s on a busy machine
    finally:
        writer.join()
    assert source == path and state["global_step"] == 3


def test_reader_falls_back_to_its_last_good_read(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text(hf_trainer_state(nonfinite_history(), max_steps=3))
    reader = TrainerStateReader(tmp_path, retries=1, delay=0.0)
    good = reader.read()
    path.write_text('{"log_history": [{"loss": 1.0')
    assert reader.read() is good
    assert "trainer_state.json: not valid JSON" in reader.last_error and "after 2 tries" in reader.last_error
    fresh = TrainerStateReader(tmp_path, retries=0)
    with pytest.raises(TrainerStateError, match="not valid JSON"):
        fresh.read()


def test_logged_events_newer_than_the_checkpoint_are_merged(tmp_path):
    write_hf_run(tmp_path, spiky_history(steps=10, every=5), max_steps=20, checkpoint=10, finished=False)
    write_events(tmp_path, [("core", "log", 5, "old", {"loss": 9.0}), ("core", "log", 15, "new", {"loss": 1.5})])
    run = load_run(tmp_path)
    assert [(e["step"], e["loss"]) for e in run.history][-1] == (15, 1.5)
    assert [e["step"] for e in run.history] == [5, 10, 15]


def test_max_grad_norm_from_training_args_bin(tmp_path):
    """The Trainer's torch-saved TrainingArguments, read without running anything from the pickle."""
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.3, report_to="none")
    torch.save(args, tmp_path / "training_args.bin")
    assert training_arg(tmp_path, "max_grad_norm") == 0.3
    assert training_arg(tmp_path, "learning_rate") == args.learning_rate
    write_hf_run(tmp_path, spiky_history(steps=10, every=5), max_steps=10)
    assert load_run(tmp_path).max_grad_norm == 0.3


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_training_args_pickle_runs_no_code(tmp_path):
    target = tmp_path / "pwned"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("training_args/data.pkl", pickle.dumps(_Exploit(str(target))))
    (tmp_path / "training_args.bin").write_bytes(buffer.getvalue())
    assert training_arg(tmp_path, "max_grad_norm") is None
    assert not target.exists()


def test_a_run_that_did_not_clip_has_no_clip(tmp_path):
    state = json.loads(hf_trainer_state(spiky_history(steps=10, every=5), max_steps=10))
    (tmp_path / "trainer_state.json").write_text(json.dumps({**state, "max_grad_norm": 0.0}))
    assert load_run(tmp_path).max_grad_norm is None


def test_before_the_first_checkpoint_events_are_read_alone(tmp_path):
    write_events(tmp_path, [("optim8bit", "info", None, "AdamW8bit", {}),
                            ("nonfinite", "skip", 4, "step 4 skipped: non-finite loss", {})])
    run = load_run(tmp_path)
    assert run.source == tmp_path / "events.jsonl" and run.history == [] and run.global_step == 4
    assert [e["step"] for e in run.events_of("skip")] == [4]
