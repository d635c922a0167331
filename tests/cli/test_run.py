"""`stabguard run` as a user types it: exit codes and messages."""

import textwrap

from click.testing import CliRunner
from support import tiny_recipe, write_recipe

from stabguard.cli import main
from stabguard.data.synth import synth_pcb
from stabguard.events import read_events

STOPPER = '''
from stabguard import Verdict, hookimpl

@hookimpl
def pre_step(state):
    if state.step == 2:
        return Verdict.stop("the test plugin says stop", "stopper")
'''


def test_stop_verdict_exits_3_with_reason_checkpoint_and_hints(tmp_path, tiny_assets, monkeypatch):
    (tmp_path / "stopper_plugin.py").write_text(textwrap.dedent(STOPPER))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tiny_recipe(tiny_assets, tmp_path / "out", training={"max_steps": 4}, plugins=["stopper_plugin"])
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.toml", recipe))])
    assert result.exit_code == 3, result.output
    assert "STOPPED at step 2: stopper: the test plugin says stop" in result.output
    # Step 2's loss came from the weights after step 1, which the stop rejected: the state after step 0.
    assert "the last verified state (after step 0) is saved as " in result.output
    assert "checkpoint-1; resume with --resume " in result.output
    assert "try:" in result.output  # hints tied to the run
    assert "\r" not in result.output and "it/s]" not in result.output, "off a terminal: whole lines, no progress bar"
    assert (tmp_path / "out" / "checkpoint-1" / "stabguard_state.json").exists()


def test_corrupt_image_is_refused_naming_sample_and_file(tmp_path, tiny_assets):
    synth_pcb(tmp_path / "data", n=4, seed=3, size=128, val_fraction=0)
    train = tmp_path / "data" / "train.jsonl"
    first_image = train.read_text().split('"image": "')[1].split('"')[0]
    (tmp_path / "data" / first_image).write_bytes(b"not a png")
    assets = {**tiny_assets, "train": train}
    recipe = tiny_recipe(assets, tmp_path / "out")
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path / "r.toml", recipe))])
    assert result.exit_code == 1, result.output
    assert "stabguard: refused:" in result.output
    assert f"{train}:1" in result.output and first_image in result.output
    errors = [e for e in read_events(tmp_path / "out" / "events.jsonl") if e["kind"] == "error"]
    assert len(errors) == 1 and first_image in errors[0]["message"]


def test_recipe_errors_exit_2(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[training]\nwarmup_ratio = 0.1\n")
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    assert "training.warmup_ratio: deprecated, then removed in transformers 5: write warmup_steps = 0.1" in result.output


def test_missing_data_is_said_the_same_way_by_validate_check_and_run(tmp_path, tiny_assets):
    from stabguard.data import missing_file

    missing = tmp_path / "data" / "mypcb" / "train.jsonl"
    recipe = write_recipe(tmp_path / "r.toml", tiny_recipe({**tiny_assets, "train": missing}, tmp_path / "out"))
    said = missing_file(missing)
    assert f"stabguard data synth-pcb --out {missing.parent}" in said and "import-deeppcb" in said
    validated = CliRunner().invoke(main, ["validate", str(recipe)])
    assert validated.exit_code == 0 and f"note: data.train: {said}" in validated.output
    checked = CliRunner().invoke(main, ["check", str(recipe)])
    assert checked.exit_code == 1 and said in checked.output
    ran = CliRunner().invoke(main, ["run", str(recipe)])
    assert ran.exit_code == 1 and f"stabguard: refused: {said}" in ran.output
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_heal_needs_resume(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "--heal"])
    assert result.exit_code == 2 and "--heal applies a remedy to a resumed run: give --resume too" in result.output


def test_resume_auto_starts_fresh_without_a_complete_checkpoint_and_resumes_the_newest_with_one(tmp_path):
    import pytest

    from stabguard.runner import resolve_resume
    from stabguard.verdict import GuardError

    (tmp_path / "checkpoint-4").mkdir()  # torn by a kill: no guard state
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert resolve_resume(tmp_path, "auto") is None
    with pytest.raises(GuardError, match="--resume last: no complete checkpoint"):
        resolve_resume(tmp_path, "last")
    for step in (2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("trainer_state.json", "stabguard_state.json"):
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")
    assert resolve_resume(tmp_path, "auto") == resolve_resume(tmp_path, "last") == str(tmp_path / "checkpoint-3")
