"""``stabguard report``: what the figure draws (lines, markers, text) and the PNG the command writes."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from PIL import Image
from support_runs import PoisonSteps, run_tiny, spiky_history, stabguard_history, write_events, write_hf_run

from stabguard.cli.report import COLORS, command, draw
from stabguard.events import read_events
from stabguard.trainer_state import load_run


def horizontal_lines(ax) -> dict[str, float]:
    """axhline-s by label: x spans the axes (0..1), y is constant."""
    return {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()
            if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1}


def vertical_lines(axes, color) -> list[float]:
    return sorted({line.get_xdata()[0] for line in axes.get_lines()
                   if line.get_color() == color and list(line.get_ydata()) == [0, 1]})


def scatter_x(ax, label) -> list[float]:
    return sorted(x for c in ax.collections if c.get_label() == label for x, _ in c.get_offsets())


def page_text(fig) -> str:
    """The diagnosis column's text, unwrapped."""
    return " ".join(t.get_text().lstrip("• ").strip() for t in fig.axes[3].texts)


def test_plain_hf_run_report(tmp_path):
    nans = (150, 155)
    write_hf_run(tmp_path, spiky_history(nan_steps=nans))
    fig, diagnosis = draw(load_run(tmp_path))
    ax_loss, ax_grad, ax_lr = fig.axes[:3]
    assert ax_grad.get_yscale() == "log"
    assert horizontal_lines(ax_grad) == {"alert 10": 10.0}, "a plain Trainer run does not say its clip"
    assert scatter_x(ax_grad, "non-finite value") == list(nans)
    assert scatter_x(ax_loss, "NaN (or 0.0 beside a NaN grad norm)") == list(nans)
    assert len(ax_lr.get_lines()[0].get_xdata()) == 60
    text = page_text(fig)
    assert "Diagnosis: TROUBLE" in text and "(no events.jsonl: a plain Trainer run)" in text
    assert "60 training log lines; clipping not recorded; alert line at grad norm 10" in text
    for finding in diagnosis.findings:
        assert finding.text.split()[0] in text and finding.text[-12:].strip() in text


def test_clip_line_from_the_option(tmp_path):
    write_hf_run(tmp_path, spiky_history())
    fig, _ = draw(load_run(tmp_path), clip=0.5, alert=20)
    assert horizontal_lines(fig.axes[1]) == {"alert 20": 20.0, "clip 0.5": 0.5}


def test_markers_for_skips_alerts_rollbacks_remedies_and_a_stop(tmp_path):
    write_hf_run(tmp_path, stabguard_history(nan_steps=(150,)))
    alerts = (120, 125, 130)
    write_events(tmp_path, [("nonfinite", "skip", 150, "step 150 skipped: non-finite gradients", {})]
                 + [("grad_norm", "alert", s, "grad norm high", {"grad_norm": 12.0, "threshold": 10.0}) for s in alerts]
                 + [("spike", "rollback", 200, "rolled back", {"loss": 9.5}), ("nonfinite", "stop", 290, "stopped", {}),
                    ("core", "remedy", 200, "quarantine", {"remedy": "quarantine", "samples": ["t.jsonl:3"]})])
    fig, diagnosis = draw(load_run(tmp_path))
    (rejected,) = [c for c in fig.axes[0].collections if c.get_label() == "loss of a dropped step (not trained on)"]
    assert rejected.get_offsets().tolist() == [[200, 9.5]], "the rolled-back step's loss is marked beside its line"
    assert "steps without an update: 2 dropped: 1 skipped, 1 rolled back" in page_text(fig)
    assert "healed instead of stopping: quarantine at step 200" in page_text(fig)
    for ax in fig.axes[:3]:
        assert vertical_lines(ax, COLORS["skip"]) == [150]
        assert vertical_lines(ax, COLORS["rollback"]) == [200]
        assert vertical_lines(ax, COLORS["stop"]) == [290]
        assert vertical_lines(ax, COLORS["remedy"]) == [200]
    assert scatter_x(fig.axes[1], "alert") == list(alerts)
    assert horizontal_lines(fig.axes[1]) == {"alert 10": 10.0, "clip 1": 1.0}
    assert diagnosis.health == "trouble" and "stopped" in page_text(fig)


def test_report_command_writes_a_png_and_prints_the_diagnosis(tmp_path):
    write_hf_run(tmp_path / "run", spiky_history())
    out = tmp_path / "report.png"
    result = CliRunner().invoke(command, [str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1650, 990)
    assert "[trouble] non-finite grad norm" in result.output and f"wrote {out}" in result.output


def test_report_without_a_state_exits_two(tmp_path):
    result = CliRunner().invoke(command, [str(tmp_path), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 2 and "no trainer_state.json" in result.stderr
    assert not (tmp_path / "r.png").exists()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_assets):
    """A real tiny run: a NaN gradient at step 2 (skipped), a grad-norm alert at every finite step."""
    tmp = tmp_path_factory.mktemp("report")
    result = run_tiny(tmp, tiny_assets, PoisonSteps(2), training={"max_steps": 3, "max_grad_norm": 0.7},
                      guards={"grad_norm": {"alert_above": 1e-6}})
    assert result.ok and result.skipped_steps == 1
    return result.output_dir


def test_real_run_report(real_run, tmp_path):
    events = read_events(real_run / "events.jsonl")
    skips = [e["step"] for e in events if e["kind"] == "skip"]
    alerts = [e["step"] for e in events if e["kind"] == "alert" and e["guard"] == "grad_norm"]
    fig, diagnosis = draw(load_run(real_run))
    ax_grad = fig.axes[1]
    assert horizontal_lines(ax_grad) == {"alert 1e-06": 1e-6, "clip 0.7": 0.7}, "clip from training_args.bin"
    assert vertical_lines(ax_grad, COLORS["skip"]) == skips == [2]
    assert scatter_x(ax_grad, "alert") == alerts and len(alerts) == 2
    loss_line = dict(zip(fig.axes[0].get_lines()[0].get_xdata(), fig.axes[0].get_lines()[0].get_ydata()))
    assert 2 not in loss_line and {1, 3} <= set(loss_line), "a window of skipped steps logs no (made-up) loss"
    assert all(math.isfinite(v) and v > 1.0 for v in loss_line.values())
    assert "1 step skipped (non-finite gradients) at step 2" in [f.text for f in diagnosis.findings]
    out = tmp_path / "real.png"
    assert CliRunner().invoke(command, [str(real_run), "-o", str(out)]).exit_code == 0 and out.stat().st_size > 10_000


def test_adaptive_clip_threshold_is_drawn(tmp_path):
    history = stabguard_history(nan_steps=())
    for line in history[10:]:
        line["stabguard/grad_norm_adaptive_threshold"] = 0.8
    write_hf_run(tmp_path, history)
    fig, _ = draw(load_run(tmp_path))
    [line] = [l for l in fig.axes[1].get_lines() if l.get_label() == "adaptive clip"]
    assert list(line.get_xdata()) == [l["step"] for l in history[10:]] and set(line.get_ydata()) == {0.8}


def where_values(modules, nonfinite=None, first=None) -> dict:
    return {"where": {"modules": modules, "nonfinite": nonfinite or {}, "first_nonfinite_output": first, "layers": {}}}


def test_the_where_panel_shows_each_anomalous_steps_modules(tmp_path):
    write_hf_run(tmp_path, stabguard_history(nan_steps=(150,)))
    q, v = "language_model.layers.3.self_attn.q_proj", "language_model.layers.0.mlp.down_proj"
    write_events(tmp_path, [
        ("nonfinite", "skip", 150, "skipped", where_values([[v, "lora_B", 1.0]], nonfinite={q: 2})),
        ("grad_norm", "alert", 120, "grad norm high", where_values([[v, "lora_B", 0.9], [q, "lora_A", 0.1]])),
        ("spike", "alert", 200, "rolled back", {}),  # says nothing about where: no column
    ])
    fig, _ = draw(load_run(tmp_path))
    panel = fig.axes[-1]
    assert panel.get_title(loc="left").startswith("where:")
    assert [t.get_text() for t in panel.get_xticklabels()] == ["step 120\nalert", "step 150\nskip"]
    rows = [t.get_text() for t in panel.get_yticklabels()]
    assert rows[0] == q, "NaN/Inf gradients lead the rows"
    assert rows[1] == f"{v} (lora_B)" and f"{q} (lora_A)" in rows
    cells = {t.get_text() for t in panel.texts}
    assert {"2 NaN/Inf", "90%", "100%", "10%"} <= cells


def test_no_where_panel_for_a_run_that_never_said_where(tmp_path):
    write_hf_run(tmp_path, spiky_history())
    fig, _ = draw(load_run(tmp_path))
    assert len(fig.axes) == 4 and not fig.axes[-1].get_title(loc="left").startswith("where")
