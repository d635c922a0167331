"""stabguard/checkpoint_formats.py: a torch zip or a safetensors file cut short is seen without a manifest;
whole files, and formats it cannot judge, pass."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from stabguard.checkpoint_formats import format_problem


def cut(path, keep):
    os.truncate(path, keep)
    return path


def test_a_torch_file_cut_short_loses_its_zip_directory(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.ones(1000)}}}, path)
    assert format_problem(path) is None
    cut(path, path.stat().st_size // 2)
    assert format_problem(path) == "optimizer.pt is cut short: a zip archive (torch.save) without its directory at the end"


def test_a_safetensors_file_must_be_as_long_as_its_header_says(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(100), "b": torch.zeros(10)}, path)
    whole = path.stat().st_size
    assert format_problem(path) is None
    cut(path, whole - 4)
    assert format_problem(path) == f"adapter_model.safetensors is {whole - 4} B, its safetensors header says {whole} B"
    cut(path, 20)
    assert "header is incomplete" in format_problem(path)


def test_what_it_cannot_judge_passes(tmp_path):
    legacy = tmp_path / "old.bin"
    legacy.write_bytes(b"\x80\x02not a zip")  # torch's pickle format before zip files
    (tmp_path / "notes.txt").write_text("x")
    assert format_problem(legacy) is None and format_problem(tmp_path / "notes.txt") is None
