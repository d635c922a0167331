"""``stabguard report OUTPUT_DIR -o report.png``: the run on one page, plots and a written diagnosis.

Loss, pre-clip grad norm on a log scale (with the clip line, the alert line and the note's "fine below
1" band), learning rate, and markers where guards acted: skips, alerts, rollbacks, a stop. Non-finite
logged values cannot be drawn as points, so they show as red crosses along the top edge. Works on a
plain Hugging Face run (``trainer_state.json`` only); events add the markers and the causes.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import click

from stabguard import metrics
from stabguard.diagnosis import (
    FINE_BELOW,
    Diagnosis,
    WhereGrid,
    alert_threshold,
    clip_value,
    diagnose,
    dropped_counts,
    dropped_text,
    grad_norms,
    losses,
    where_grid,
)
from stabguard.trainer_state import RunState, TrainerStateError, as_float, load_run

COLORS = {"ok": "#2e7d32", "warn": "#b26a00", "trouble": "#c62828", "skip": "#d32f2f", "alert": "#ef6c00",
          "rollback": "#6a1b9a", "stop": "black", "clip": "#1565c0", "remedy": "#2e7d32"}


def skip_steps(run: RunState) -> list[int]:
    """Skipped steps from events; for a run without them, where the logged skip counter went up."""
    steps = run.event_steps("skip")
    if steps:
        return steps
    counter = run.column(metrics.SKIPPED_STEPS)
    return [s for (_, a), (s, b) in zip(counter, counter[1:]) if b > a] + [s for s, v in counter[:1] if v > 0]


def plot_series(ax, points, bad_label: str = "non-finite value", **style) -> None:
    """Finite points as a line (broken where a value is not); non-finite ones as red crosses on top."""
    if len(points) > 150:
        style.pop("marker", None)  # dots would blur into a thick line
    if any(math.isfinite(v) for _, v in points):
        ax.plot([s for s, _ in points], [v if math.isfinite(v) else math.nan for _, v in points], **style)
    bad = [s for s, v in points if not math.isfinite(v)]
    if bad:
        ax.scatter(bad, [0.96] * len(bad), marker="X", s=60, color=COLORS["trouble"], zorder=5,
                   transform=ax.get_xaxis_transform(), label=bad_label, clip_on=False)


def mark_events(axes, run: RunState) -> None:
    """Vertical lines through every plot: skips (thin red), rollbacks (purple), remedies (green), a stop
    (black)."""
    kinds = (("skip", skip_steps(run), ":", 1.2), ("rollback", run.event_steps("rollback"), "-.", 1.5),
             ("remedy", run.event_steps("remedy"), "--", 1.5), ("stop", run.event_steps("stop"), "-", 2.0))
    for kind, steps, style, width in kinds:
        for i, step in enumerate(steps):
            for ax in axes:
                ax.axvline(step, color=COLORS[kind], linestyle=style, linewidth=width, alpha=0.7,
                           label=f"{'skipped step' if kind == 'skip' else kind}" if i == 0 and ax is axes[0] else None)


def grad_limits(values: list[float], lines: list[float]) -> tuple[float, float]:
    positive = [v for v in values + lines if math.isfinite(v) and v > 0]
    return (min(positive) / 2, max(positive) * 3) if positive else (1e-2, 100.0)


def plot_grad_norm(ax, run: RunState, clip: float | None, alert: float) -> None:
    norms = grad_norms(run)
    plot_series(ax, norms, color="#37474f", marker=".", linewidth=1.2, label="pre-clip grad norm")
    post = dict(run.column(metrics.GRAD_NORM_POST_CLIP))
    if post and clip:  # no post-clip value on a skipped step: the line breaks there
        ax.plot([s for s, _ in norms], [post.get(s, math.nan) for s, _ in norms], color=COLORS["clip"],
                linewidth=0.9, alpha=0.6, label="post-clip")
    adaptive = run.column(metrics.GRAD_NORM_ADAPTIVE_THRESHOLD)
    if adaptive:
        ax.plot(*zip(*adaptive), color=COLORS["clip"], linestyle=":", linewidth=1.2, label="adaptive clip")
    peaks = [(s, p) for s, p in run.column(metrics.GRAD_NORM_MAX_SINCE_LOG)
             if math.isfinite(p) and p > dict(norms).get(s, math.inf) * 1.001]
    if peaks:
        ax.scatter(*zip(*peaks), marker="^", s=18, color="#78909c", label="max since previous log", zorder=4)
    low, high = grad_limits([v for _, v in norms] + [p for _, p in peaks], [alert] + ([clip] if clip else []))
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    log_ticks(ax)
    ax.axhspan(low, min(FINE_BELOW, alert, high), color=COLORS["ok"], alpha=0.06, label=f"fine (< {FINE_BELOW:g})")
    ax.axhspan(alert, max(high, alert), color=COLORS["trouble"], alpha=0.06)
    ax.axhline(alert, color=COLORS["trouble"], linestyle="--", linewidth=1, label=f"alert {alert:g}")
    if clip:
        ax.axhline(clip, color=COLORS["clip"], linestyle="--", linewidth=1, label=f"clip {clip:g}")
    alerts = [(e["step"], as_float((e.get("values") or {}).get("grad_norm"))) for e in run.events_of("alert")
              if isinstance(e.get("step"), int)]
    if alerts:
        ys = [v if v is not None and math.isfinite(v) and low < v < high else high / 1.6 for _, v in alerts]
        ax.scatter([s for s, _ in alerts], ys, marker="v", s=55, color=COLORS["alert"], zorder=6,
                   edgecolor="white", label="alert")


def log_ticks(ax) -> None:
    """1, 2, 5 per decade, written as plain numbers: a norm of 0.3 should read as 0.3, not 3×10⁻¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_lr(ax, run: RunState) -> None:
    points = run.column("learning_rate")
    plot_series(ax, points, color="#00897b", linewidth=1.4, label="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def write_diagnosis(ax, run: RunState, diagnosis: Diagnosis, clip: float | None, alert: float) -> None:
    """The findings as wrapped lines, coloured by severity, in the right-hand column."""
    ax.axis("off")
    lines = [(f"Diagnosis: {diagnosis.health.upper()}", diagnosis.health, 13, "bold")]
    lines += [(fact, None, 9.5, "normal") for fact in run_facts(run, clip, alert)]
    for finding in diagnosis.findings:
        for i, part in enumerate(textwrap.wrap(finding.text, 46)):
            lines.append((("• " if i == 0 else "  ") + part, finding.severity, 10, "normal"))
    y = 1.0
    for n, (text, severity, size, weight) in enumerate(lines):
        if y < 0.04:  # the rest would fall off the page; the command prints every finding anyway
            ax.text(0.0, y, f"… {len(lines) - n} more lines: see the printed diagnosis", transform=ax.transAxes,
                    va="top", fontsize=9, style="italic")
            break
        ax.text(0.0, y, text, transform=ax.transAxes, va="top", ha="left", fontsize=size, fontweight=weight,
                color=COLORS.get(severity, "#212121"), family="DejaVu Sans")
        y -= 0.042 if size > 11 else 0.034 if severity is None else 0.031


def run_facts(run: RunState, clip: float | None, alert: float) -> list[str]:
    """Where the numbers come from, so that a reader can trust (or question) the lines."""
    total = f" of {run.max_steps}" if run.max_steps else ""
    runtime = as_float(run.summary.get("train_runtime")) if run.summary else None
    state = "stopped" if run.events_of("stop") else "finished" if run.finished else "running"
    done = f", {state}" + (f" in {runtime:.0f} s" if runtime else "")
    source = run.source.relative_to(run.output_dir) if run.source.is_relative_to(run.output_dir) else run.source
    events = f"and {len(run.events)} events" if run.events else "(no events.jsonl: a plain Trainer run)"
    clipped = f"gradients clipped at {clip:g}" if clip else "clipping not recorded"
    facts = [f"step {run.global_step}{total}{done}", f"read from {source} {events}",
             f"{len(run.history)} training log lines; {clipped}; alert line at grad norm {alert:g}"]
    if run.events or run.column(metrics.SKIPPED_STEPS):
        facts.append(f"steps without an update: {dropped_text(*dropped_counts(run))}")
    remedies = [e for e in run.events_of("remedy") if (e.get("values") or {}).get("remedy") != "cool_down_end"]
    if remedies:
        named = ", ".join(f"{(e.get('values') or {}).get('remedy')} at step {e.get('step')}" for e in remedies)
        facts.append(f"healed instead of stopping: {named}")
    return facts + [""]


def rejected_losses(run: RunState) -> list[tuple[int, float]]:
    """The loss of each skipped or rolled-back step, as its event recorded it: the Trainer's log leaves
    dropped steps out, so without these a rollback's spike would not show beside its line."""
    points = [(e["step"], as_float((e.get("values") or {}).get("loss"))) for e in run.events_of("skip", "rollback")
              if isinstance(e.get("step"), int)]
    return [(s, v) for s, v in points if v is not None and math.isfinite(v)]


def plot_where(ax, grid: WhereGrid) -> None:
    """Where the anomalous steps broke: a heat map, one row per module, one column per step, the cell's
    shade the module's share of that step's squared grad norm; red cells hold NaN/Inf gradients."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    shares = np.array(grid.shares)
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    bad = np.array([[1.0 if n else np.nan for n in row] for row in grid.nonfinite])
    ax.imshow(bad, cmap=ListedColormap([COLORS["trouble"]]), vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(shares):
        for c, value in enumerate(row):
            count = grid.nonfinite[r][c]
            text = f"{count} NaN/Inf" if count else (f"{value:.0%}" if value >= 0.005 else "")
            ax.text(c, r, text, ha="center", va="center", fontsize=8,
                    color="white" if count or value > 0.6 else "black")
    ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=8)
    ax.set_xticks(range(len(grid.columns)), [f"step {s}\n{kind}" for s, kind in grid.columns], fontsize=8)
    ax.set_title("where: each anomalous step's share of the squared grad norm by module (red: NaN/Inf gradients)",
                 fontsize=10, loc="left")


def draw(run: RunState, *, clip: float | None = None, alert: float | None = None):
    """The report as a matplotlib figure (Agg, no display needed) and the diagnosis written beside it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    diagnosis = diagnose(run)
    clip = clip if clip is not None else clip_value(run)
    alert = alert if alert is not None else alert_threshold(run)
    where = where_grid(run)
    rows = [1.1, 1.3, 0.8] + ([0.9] if where else [])
    fig = Figure(figsize=(15, 9 + 2.5 * bool(where)), layout="constrained")
    grid = fig.add_gridspec(len(rows), 2, width_ratios=[2.4, 1], height_ratios=rows)
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_grad = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_lr = fig.add_subplot(grid[2, 0], sharex=ax_loss)
    plot_series(ax_loss, losses(run), "NaN (or 0.0 beside a NaN grad norm)", color="#1e88e5", marker=".",
                linewidth=1.4, label="loss")
    rejected = rejected_losses(run)
    if rejected:
        ax_loss.scatter(*zip(*rejected), s=60, facecolors="none", edgecolors=COLORS["rollback"], linewidths=1.6,
                        zorder=6, label="loss of a dropped step (not trained on)")
    plot_grad_norm(ax_grad, run, clip, alert)
    plot_lr(ax_lr, run)
    mark_events([ax_loss, ax_grad, ax_lr], run)
    for ax, name in ((ax_loss, "loss"), (ax_grad, "grad norm (pre-clip, log)"), (ax_lr, "learning rate")):
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, ncols=2, framealpha=0.85)
    for ax in (ax_loss, ax_grad):
        ax.tick_params(labelbottom=False)
    ax_lr.set_xlabel("step")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not run.history:
        ax_loss.text(0.5, 0.5, "no training log lines yet", transform=ax_loss.transAxes, ha="center", color="gray")
    write_diagnosis(fig.add_subplot(grid[:, 1]), run, diagnosis, clip, alert)
    if where:
        plot_where(fig.add_subplot(grid[3, 0]), where)
    fig.suptitle(f"stabguard report: {run.output_dir}", fontsize=13, x=0.01, ha="left")
    return fig, diagnosis


def render(run: RunState, output: Path, *, clip: float | None = None, alert: float | None = None) -> Diagnosis:
    """Draw the report for ``run`` into ``output`` (png, svg, pdf: by its suffix)."""
    fig, diagnosis = draw(run, clip=clip, alert=alert)
    fig.savefig(output, dpi=110)
    return diagnosis


@click.command("report")
@click.argument("output_dir", type=click.Path(exists=True))
@click.option("-o", "--output", default="report.png", show_default=True, type=click.Path(dir_okay=False),
              help="image to write (png, svg, pdf)")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=None,
              help="clip line to draw when the run does not record its max_grad_norm")
@click.option("--alert-above", type=click.FloatRange(min=0, min_open=True), default=None,
              help="alert line (default: the grad_norm guard's, else 10)")
@click.option("--run", "run_id", default=None, metavar="ID|all",
              help="which run of events.jsonl to show (a resume is a new run); default: the latest")
def command(output_dir, output, clip, alert_above, run_id):
    """Plot a training run's OUTPUT_DIR (any Hugging Face Trainer run) with a written diagnosis."""
    try:
        run = load_run(output_dir, run=run_id)
    except TrainerStateError as exc:
        click.echo(f"stabguard report: {exc}", err=True)
        raise SystemExit(2) from None
    diagnosis = render(run, Path(output), clip=clip, alert=alert_above)
    click.echo(diagnosis.text())
    click.echo(f"stabguard report: wrote {output}")
