"""Checkpoints of real (tiny) runs, damaged for real: a torn file, a missing file, a kill -9 in the middle of a
save, a full disk (ENOSPC), checkpoints from before manifests. Each resumes from the right one or says why it
cannot, naming the file. The manifest and the choice themselves are tested in tests/test_checkpoints.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from stabguard.checkpoints import GUARD_STATE_FILE, MANIFEST_FILE, ResumeError, SaveError, checkpoints, verify
from stabguard.cli import main
from stabguard.runner import resolve_resume, run
from stabguard.testing import tiny_recipe, write_recipe

SAVES = {"max_steps": 6, "save_steps": 2}


@pytest.fixture(scope="module")
def saved_run(tiny_assets, tmp_path_factory):
    """One run that saved checkpoints 2, 4 and 6, copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("saved")
    recipe = tiny_recipe(tiny_assets, folder / "out", training=SAVES)
    result = run(write_recipe(folder / "recipe.toml", recipe))
    assert result.ok
    return folder / "out"


@pytest.fixture
def run_copy(saved_run, tmp_path, tiny_assets):
    """(output_dir, recipe path) of a copy of the saved run, the recipe going on to step 8."""
    out = tmp_path / "out"
    shutil.copytree(saved_run, out)
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, out, training={**SAVES, "max_steps": 8}))
    return out, recipe


def cut_in_half(path):
    os.truncate(path, path.stat().st_size // 2)


def test_every_save_is_committed_with_a_manifest(saved_run):
    assert [p.name for p in checkpoints(saved_run)] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
    for folder in checkpoints(saved_run):
        assert verify(folder).status == "verified", folder
        assert json.loads((folder / GUARD_STATE_FILE).read_text())["manifest"] is True
    listed = json.loads((saved_run / MANIFEST_FILE).read_text())["files"]
    assert "adapter_model.safetensors" in listed and "events.jsonl" not in listed, "the final save has one too"
    assert not any(name.startswith("checkpoint-") for name in listed)


def test_a_torn_optimizer_falls_back_and_the_resume_goes_on_from_there(run_copy, capsys):
    out, recipe = run_copy
    cut_in_half(out / "checkpoint-6" / "optimizer.pt")
    result = run(recipe, resume="auto")
    assert result.ok and result.global_step == 8
    said = capsys.readouterr().err
    assert "checkpoint-6: optimizer.pt is " in said and ", the manifest says " in said and "; skipped" in said
    assert f"resuming from {out / 'checkpoint-4'} (the newest that verifies)" in said
    assert verify(out / "checkpoint-6").status == "verified", "step 6 was trained and saved again, whole"


def test_an_explicit_path_that_fails_exits_2_naming_the_file_and_the_newest_good_one(run_copy):
    out, recipe = run_copy
    cut_in_half(out / "checkpoint-6" / "optimizer.pt")
    ran = CliRunner().invoke(main, ["run", str(recipe), "--resume", str(out / "checkpoint-6")])
    assert ran.exit_code == 2, ran.output
    assert "checkpoint-6: optimizer.pt is " in ran.output
    assert f"the newest good one is {out / 'checkpoint-4'}" in ran.output
    assert "Traceback" not in ran.output


def framework_trainer(recipe_path, out):
    """The trainer as a framework holds it: built, then ``train(resume_from_checkpoint=...)`` called by the
    framework's own code, not by ``stabguard run`` (which verifies before it calls)."""
    import transformers

    from stabguard.events import EventLog
    from stabguard.runner import build_trainer, prepare, run_arguments

    recipe, plugins = prepare(recipe_path)
    plugins.enable_guards(recipe.guards)
    args = transformers.TrainingArguments(**run_arguments(recipe))
    return build_trainer(recipe, plugins, EventLog(out / "events.jsonl"), args)


def test_a_framework_s_resume_is_verified_too(run_copy, capsys):
    """resume_from_checkpoint=True is the Trainer's highest-numbered folder, complete or not: the guarded
    trainer takes the newest that verifies instead, and says so; an explicit damaged folder is refused."""
    out, recipe = run_copy
    cut_in_half(out / "checkpoint-6" / "optimizer.pt")
    trainer = framework_trainer(recipe, out)
    with pytest.raises(ResumeError, match="^resume_from_checkpoint=.*checkpoint-6: checkpoint-6: optimizer.pt is .*"
                       r"the newest good one is .*checkpoint-4 \(resume_from_checkpoint .*checkpoint-4, or "
                       r"resume_from_checkpoint=true\)"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8
    said = capsys.readouterr().out
    assert f"stabguard: resume: resuming from {out / 'checkpoint-4'} (the newest that verifies)" in said
    restored = [e for e in trainer.events.events if e["message"].startswith("guard state restored from")]
    assert [e["values"]["resumed_from"] for e in restored] == [str(out / "checkpoint-4")]


def test_a_missing_file_is_named_and_passed_over(run_copy):
    out, _ = run_copy
    (out / "checkpoint-6" / "scheduler.pt").unlink()
    (out / "checkpoint-4" / "rng_state.pth").write_bytes(b"rotten")
    assert resolve_resume(out, "last") == str(out / "checkpoint-2")
    assert verify(out / "checkpoint-6").describe() == "checkpoint-6: scheduler.pt is missing"
    assert verify(out / "checkpoint-4").describe().startswith("checkpoint-4: rng_state.pth is 6 B, the manifest says ")


def test_checkpoints_from_before_manifests_still_resume_with_a_warning(run_copy, capsys):
    out, _ = run_copy
    for folder in checkpoints(out):
        (folder / MANIFEST_FILE).unlink()
        state = json.loads((folder / GUARD_STATE_FILE).read_text())
        (folder / GUARD_STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "manifest"}))
    cut_in_half(out / "checkpoint-6" / "optimizer.pt")  # still seen: a torch zip cut short
    assert resolve_resume(out, "auto") == str(out / "checkpoint-4")
    said = capsys.readouterr().err
    assert "checkpoint-6: optimizer.pt is cut short" in said
    assert "checkpoint-4: saved before manifests" in said and "resuming anyway" in said


def full_disk_at(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("failing", ["optimizer.pt", MANIFEST_FILE])
def test_a_full_disk_fails_the_save_and_keeps_the_verified_one(tmp_path, tiny_assets, monkeypatch, failing):
    """ENOSPC half-way through step 6's optimizer.pt (the Trainer's part), or at its manifest (after the
    Trainer's part, where the Trainer itself rotates): with save_total_limit = 1, checkpoint-4 must stay
    until step 6 is committed, which never happens."""
    import stabguard.trainer

    real_save, real_manifest = torch.save, stabguard.trainer.write_manifest

    def torch_save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-6", failing)):
            open(f, "wb").write(b"PK\x03\x04 half of it")
            full_disk_at(f)
        return real_save(obj, f, *args, **kwargs)

    def write_manifest(folder, **kwargs):
        if str(folder).endswith("checkpoint-6") and failing == MANIFEST_FILE:
            full_disk_at(os.path.join(folder, MANIFEST_FILE))
        return real_manifest(folder, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(stabguard.trainer, "write_manifest", write_manifest)
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={**SAVES, "save_total_limit": 1})
    with pytest.raises(SaveError) as failed:
        run(write_recipe(tmp_path / "recipe.toml", recipe))
    message = str(failed.value)
    assert message.startswith("checkpoint-6: the save failed ([Errno 28] No space left on device: ")
    assert failing in message and "the newest committed one is checkpoint-4" in message
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["checkpoint-4"], "rotation ran only after commits"
    assert verify(tmp_path / "out" / "checkpoint-4").status == "verified"


KILLED_MID_SAVE = """
import pathlib, sys, time, torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if str(f).endswith("checkpoint-4/optimizer.pt"):  # half written, then this process is killed
        open(f, "wb").write(b"PK" + bytes(1000))
        pathlib.Path(sys.argv[2]).touch()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = slow_save
from stabguard.runner import run
run(sys.argv[1])
"""


def test_kill_9_in_the_middle_of_a_save_leaves_an_invisible_folder(tmp_path, tiny_assets):
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_recipe(tiny_assets, tmp_path / "out", training=SAVES))
    mark = tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(recipe), str(mark)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not mark.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the save of checkpoint-4 never started"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    out = tmp_path / "out"
    assert verify(out / "checkpoint-4").status == "incomplete"
    with pytest.raises(ResumeError, match="checkpoint-4: no stabguard_manifest.json and no trainer_state"):
        resolve_resume(out, str(out / "checkpoint-4"))
    result = run(recipe, resume="auto")
    assert result.ok and result.global_step == 6
    assert verify(out / "checkpoint-4").status == "verified", "saved again, whole, by the resumed run"
