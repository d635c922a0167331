"""Guard metrics flow through the Trainer's logs: with report_to = ["tensorboard"] they are TensorBoard scalars."""

from __future__ import annotations

import math

import pytest
from support_runs import PoisonSteps, run_tiny

from stabguard.trainer_state import parse_trainer_state

pytest.importorskip("tensorboard")


def scalars(output_dir) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard event file(s), read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(output_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {output_dir}"
    found: dict[str, dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return found


def same(a: float, b: float) -> bool:
    """Equal as float32 (TensorBoard's precision), NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)


def test_stabguard_metrics_are_tensorboard_scalars(tmp_path, tiny_assets):
    result = run_tiny(tmp_path, tiny_assets, PoisonSteps(2),
                      training={"max_steps": 3, "logging_steps": 1, "report_to": ["tensorboard"]})
    assert result.ok and result.skipped_steps == 1
    board = scalars(result.output_dir)
    logged = parse_trainer_state((result.output_dir / "trainer_state.json").read_text())["log_history"]
    keys = {k for line in logged for k in line if k.startswith("stabguard/")}
    assert {"stabguard/skipped_steps", "stabguard/grad_norm_pre_clip", "stabguard/nonfinite_steps"} <= keys
    for key in keys:
        tag = next((t for t in board if t.endswith(key)), None)
        assert tag is not None, f"{key} is in trainer_state.json but not in TensorBoard (tags: {sorted(board)})"
        for line in logged:
            if key in line:
                shown, value = board[tag][line["step"]], line[key]
                assert same(shown, value), (key, line["step"], shown, value)
    assert board[next(t for t in board if t.endswith("stabguard/skipped_steps"))] == {1: 0, 2: 1, 3: 1}
