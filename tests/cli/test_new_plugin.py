"""``stabguard new-plugin``: the package it writes installs with ``pip install -e`` and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from stabguard.cli import main


def test_a_bad_name_or_a_full_folder_is_refused(tmp_path):
    bad = CliRunner().invoke(main, ["new-plugin", "Loss-Ceiling", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'Loss-Ceiling'" in bad.output and "loss_ceiling" in bad.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    full = CliRunner().invoke(main, ["new-plugin", "ceiling", "--out", str(tmp_path / "full")])
    assert full.exit_code == 2 and "exists and is not empty" in full.output


def test_the_generated_package_installs_and_passes_its_own_tests(tmp_path):
    out = tmp_path / "stabguard-loss-ceiling"
    made = CliRunner().invoke(main, ["new-plugin", "loss_ceiling", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", "stabguard_loss_ceiling.py", "tests/test_loss_ceiling.py"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "STABGUARD_DISABLE_PLUGIN_AUTOLOAD": "1"}
    installed = subprocess.run([*pip, "install", "--no-deps", "-e", str(out)],
                               capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    try:
        tested = subprocess.run([sys.executable, "-m", "pytest", "-q", str(out)], cwd=out, capture_output=True,
                                text=True, env=env, timeout=600)
        assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-2000:]
        assert "4 passed" in tested.stdout
    finally:
        subprocess.run([*pip, "uninstall", "-y", "stabguard-loss-ceiling"], capture_output=True, env=env)


def test_the_next_step_it_prints_is_the_one_the_readme_gives(tmp_path, monkeypatch):
    """What new-plugin prints and the README's "Write your own guard" lines are the same commands."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    made = CliRunner().invoke(main, ["new-plugin", "loss_ceiling", "--out", "my-guard"])
    generated_readme = Path("my-guard/README.md").read_text()
    assert made.exit_code == 0, made.output
    (next_line,) = [line for line in made.output.splitlines() if line.startswith("next: ")]
    command = next_line.removeprefix("next: ")
    assert "[test]" in command and "python -m pytest" in command, "pytest comes with the package's test extra"
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "stabguard new-plugin loss_ceiling --out my-guard" in readme and command in readme
    assert "pip install -e '.[test]'" in generated_readme and "https://github.com/)" not in generated_readme
