"""pytest fixtures for guard authors, loaded through the ``pytest11`` entry point ``stabguard``.

Importing this module is cheap (no torch): the model is built only by a test that asks for it.
"""

from __future__ import annotations

import functools

import pytest


@pytest.fixture(scope="session")
def stabguard_tiny_assets(tmp_path_factory):
    """The tiny random Qwen3-VL and a small synthetic PCB set, built once per session
    (``{"model": folder, "train": jsonl, "val": jsonl}``)."""
    from stabguard.testing import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("stabguard-tiny"))


@pytest.fixture
def run_guard(stabguard_tiny_assets, tmp_path):
    """:func:`stabguard.testing.run_guard` with ``assets`` and ``tmp_path`` filled in."""
    from stabguard.testing import run_guard as run

    return functools.partial(run, tmp_path=tmp_path, assets=stabguard_tiny_assets)
