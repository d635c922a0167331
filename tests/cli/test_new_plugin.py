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
