"""``stabguard monitor OUTPUT_DIR``: watch a run from a second terminal, or check it once from a script.

For any Hugging Face run: last step, loss trend, pre/post-clip grad norm against the usual LoRA
rule of thumb (below 1 fine, above 10 trouble), learning rate, skipped steps,
alerts and ETA, read from ``trainer_state.json`` (the newest checkpoint's while training) and
``events.jsonl``. ``--once`` prints plain text and sets the exit code: 0 healthy (warnings included),
1 unhealthy, 2 nothing to read yet.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import click

from stabguard import metrics
from stabguard.diagnosis import (
    FINE_BELOW,
    Diagnosis,
    alert_threshold,
    brief,
    clip_value,
    diagnose,
    dropped_counts,
    dropped_text,
    grad_norms,
    losses,
    num,
    where_events,
)
from stabguard.trainer_state import RunState, TrainerStateError, TrainerStateReader
from stabguard.where import Where

EXIT_OK, EXIT_UNHEALTHY, EXIT_NO_STATE = 0, 1, 2
SPARK = "▁▂▃▄▅▆▇█"
STYLES = {"ok": "green", "warn": "yellow", "trouble": "bold red"}


@dataclass
class Row:
    label: str
    text: str
    severity: str = "ok"


def sparkline(values: list[float], width: int = 24) -> str:
    """The last ``width`` values as block characters; a non-finite value shows as "!"."""
    values = values[-width:]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * len(values)
    low, high = min(finite), max(finite)
    scale = (len(SPARK) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK[round((v - low) * scale)] if math.isfinite(v) else "!" for v in values)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def seconds_per_step(run: RunState, recent: int = 10) -> float | None:
    """From the latest (step, time) pairs: events with a step and checkpoint save times."""
    pairs = run.step_times[-recent:]
    if len(pairs) < 2 or pairs[-1][0] <= pairs[0][0]:
        return None
    return (pairs[-1][1] - pairs[0][1]) / (pairs[-1][0] - pairs[0][0])


def progress_rows(run: RunState) -> list[Row]:
    total = f" / {run.max_steps} ({100 * run.global_step / run.max_steps:.0f}%)" if run.max_steps else ""
    rows = [Row("step", f"{run.global_step}{total}")]
    # One label for a running and an ended run: "ETA finished in 1m 25s" read as a contradiction.
    if run.events_of("stop"):
        rows.append(Row("time", "run stopped", "trouble"))
    elif run.finished:
        runtime = run.summary.get("train_runtime") if run.summary else None
        rows.append(Row("time", f"finished{f' in {duration(runtime)}' if runtime else ''}"))
    else:
        rate = seconds_per_step(run)
        left = (run.max_steps - run.global_step) * rate if rate and run.max_steps else None
        rows.append(Row("time", f"{duration(left)} left ({rate:.2f} s/step)" if left is not None
                        else "time left not known yet (needs two timed steps)"))
    return rows


def loss_row(run: RunState) -> Row:
    points = losses(run)
    if not points:
        return Row("loss", "none logged yet", "warn")
    values = [v for _, v in points]
    finite = [v for v in values if math.isfinite(v)]
    trend = f"{num(finite[0])} → {num(finite[-1])}" if finite else "no finite value"
    severity = "ok" if math.isfinite(values[-1]) else "trouble"
    return Row("loss", f"{num(values[-1])}  {sparkline(values)}  {trend}", severity)


def grad_norm_row(run: RunState) -> Row:
    norms = grad_norms(run)
    if not norms:
        return Row("grad norm", "none logged yet", "warn")
    step, pre = norms[-1]
    post = dict(run.column(metrics.GRAD_NORM_POST_CLIP)).get(step)
    alert, clip = alert_threshold(run), clip_value(run)
    parts = [f"pre-clip {num(pre)}"] + ([f"post-clip {num(post)}"] if post is not None else [])
    parts.append(f"clip {clip:g}" if clip else "no clip")
    severity = "trouble" if not math.isfinite(pre) or pre > alert else "warn" if pre > FINE_BELOW else "ok"
    limits = f"fine < {FINE_BELOW:g}, trouble > {alert:g}"
    return Row("grad norm", f"{', '.join(parts)} (step {step}; {limits})", severity)


def lr_row(run: RunState) -> Row:
    points = [(s, v) for s, v in run.column("learning_rate") if math.isfinite(v)]
    if not points:
        return Row("lr", "none logged")
    peak_step, peak = max(points, key=lambda p: p[1])
    phase = "warming up" if points[-1][0] == peak_step and len(points) > 1 else "decaying" if points[-1][1] < peak else "flat"
    return Row("lr", f"{points[-1][1]:.2e} ({phase}; peak {peak:.2e} at step {peak_step})")


def event_rows(run: RunState, last: int = 3) -> list[Row]:
    skipped, rolled_back = dropped_counts(run)
    dropped = run.event_steps("skip", "rollback")
    where = f" (last at step {dropped[-1]})" if dropped else ""
    rows = [Row("dropped", f"{dropped_text(skipped, rolled_back)}{where}", "warn" if skipped + rolled_back else "ok")]
    alerts = run.events_of("alert", "rollback", "stop")
    counts = [f"{len(run.events_of(k))} {k}{'s' if len(run.events_of(k)) > 1 else ''}"
              for k in ("alert", "rollback", "stop") if run.events_of(k)]
    rows.append(Row("alerts", ", ".join(counts) or "none", "warn" if alerts else "ok"))
    rows += [Row("", f"step {e.get('step')}: [{e.get('guard')}] {brief(e.get('message', ''))}", "warn")
             for e in alerts[-last:]]
    remedies = [e for e in run.events_of("remedy") if (e.get("values") or {}).get("remedy") != "cool_down_end"]
    if remedies:
        quarantined = sum(len((e.get("values") or {}).get("samples") or []) for e in remedies)
        last = remedies[-1]
        rows.append(Row("healed", f"{len(remedies)} remed{'y' if len(remedies) == 1 else 'ies'}"
                        f"{f', {quarantined} sample(s) quarantined' if quarantined else ''}; last at step "
                        f"{last.get('step')}: {(last.get('values') or {}).get('remedy')} "
                        f"({(last.get('values') or {}).get('budget_left')} left in the budget)", "warn"))
    located = where_events(run)
    if located:
        latest = located[-1]
        rows.append(Row("where", f"step {latest.get('step')}: {Where.from_values(latest['values']['where']).brief()}",
                        "warn"))
    return rows


def snapshot(run: RunState, diagnosis: Diagnosis, now: float | None = None) -> tuple[str, list[Row]]:
    """A title and the rows both views show."""
    age = f", updated {duration((now or time.time()) - run.updated)} ago" if run.updated else ""
    source = run.source.relative_to(run.output_dir) if run.source.is_relative_to(run.output_dir) else run.source
    title = f"stabguard monitor: {run.output_dir} ({source}{age}){run_label(run)}"
    rows = [Row("status", diagnosis.health.upper(), diagnosis.health), *progress_rows(run), loss_row(run),
            grad_norm_row(run), lr_row(run), *event_rows(run)]
    rows += [Row("diagnosis" if i == 0 else "", f"[{f.severity}] {f.text}", f.severity)
             for i, f in enumerate(diagnosis.findings)]
    return title, rows


def run_label(run: RunState) -> str:
    """Which run of events.jsonl is shown, when the folder holds more than one."""
    if len(run.runs) < 2:
        return ""
    which = "every run" if run.run_id == "all" else f"run {run.run_id}"
    return f"; {which} of {len(run.runs)} (--run ID|all)"


def plain_text(title: str, rows: list[Row]) -> str:
    width = max(len(r.label) for r in rows)
    return "\n".join([title, *(f"{r.label:<{width}}  {r.text}" for r in rows)])


def rich_view(title: str, rows: list[Row], note: str | None = None):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False, box=None, title_justify="left", expand=False)
    table.add_column(style="bold")
    table.add_column()
    for row in rows:
        table.add_row(row.label, Text(row.text, style=STYLES.get(row.severity, "")))
    if note:
        table.caption = note
    return table


def watch(reader: TrainerStateReader, interval: float, console=None) -> int:
    """Refresh in place until the run finishes or stops (or Ctrl-C); returns the exit code."""
    from rich.console import Console
    from rich.live import Live

    code = EXIT_NO_STATE
    with Live(console=console or Console(), auto_refresh=False) as live:
        try:
            while True:
                view, run, code = _read_view(reader)
                live.update(view, refresh=True)
                if run is not None and (run.finished or run.events_of("stop")):
                    return code
                time.sleep(interval)
        except KeyboardInterrupt:
            return code


def _read_view(reader: TrainerStateReader):
    try:
        run = reader.read()
    except TrainerStateError as exc:
        from rich.text import Text

        return Text(f"waiting: {exc}"), None, EXIT_NO_STATE
    diagnosis = diagnose(run)
    note = f"last read failed, showing the previous one: {reader.last_error}" if reader.last_error else None
    view = rich_view(*snapshot(run, diagnosis), note=note)
    return view, run, EXIT_UNHEALTHY if diagnosis.health == "trouble" else EXIT_OK


def wait_for_folder(path: Path, timeout: float, interval: float) -> bool:
    """A monitor started before the run: wait for the run to create its output folder."""
    if path.exists():
        return True
    click.echo(f"stabguard monitor: waiting for {path} (the run creates it when it starts; "
               f"giving up after {timeout:g} s, Ctrl-C to stop)", err=True)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, 1.0))
    return True


@click.command("monitor")
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="seconds between refreshes")
@click.option("--wait", "wait_s", default=600.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds to wait for OUTPUT_DIR to appear (not with --once)")
@click.option("--once", is_flag=True, help="print one plain-text snapshot; exit 1 if unhealthy, 2 if nothing to read")
@click.option("--run", "run_id", default=None, metavar="ID|all",
              help="which run of events.jsonl to show (a resume is a new run); default: the latest")
def command(output_dir, interval, wait_s, once, run_id):
    """Watch a training run's OUTPUT_DIR (any Hugging Face Trainer run; stabguard events when present).

    Thresholds: a pre-clip grad norm below 1 is fine, above 10 is trouble (the usual rule of thumb for
    LoRA fine-tuning; the grad_norm guard's own alert line when its alerts name one). Started before the
    run, it waits for OUTPUT_DIR to appear.
    """
    if not (output_dir.exists() if once else wait_for_folder(output_dir, wait_s, interval)):
        click.echo(f"stabguard monitor: {output_dir} does not exist; start the run, or check the path", err=True)
        raise SystemExit(EXIT_NO_STATE)
    reader = TrainerStateReader(output_dir, run=run_id)
    if not once:
        raise SystemExit(watch(reader, interval))
    try:
        run = reader.read()
    except TrainerStateError as exc:
        click.echo(f"stabguard monitor: {exc}", err=True)
        raise SystemExit(EXIT_NO_STATE) from None
    diagnosis = diagnose(run)
    click.echo(plain_text(*snapshot(run, diagnosis)))
    raise SystemExit(EXIT_UNHEALTHY if diagnosis.health == "trouble" else EXIT_OK)
