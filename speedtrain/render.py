"""Render speed reports, plans, probes, tune results and preparations as rich renderables, and a report as a PNG.

Everything here reads typed values (SpeedReport and what it holds); the JSON layout is speedreport.py's alone.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from speedtrain import knobs
from speedtrain.dataset import Problem
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import TrainPlan, said
from speedtrain.records import DatasetSummary, Preparation, ResizeSummary, StageProgress, StageResult, TuneResult
from speedtrain.schedule import Schedule
from speedtrain.util import duration, fmt_map, spread

if TYPE_CHECKING:  # a SpeedReport and a Comparison render themselves through this module: their types only
    from speedtrain.comparison import Comparison
    from speedtrain.speedreport import SpeedReport, StageReport

MEASURED_CAPTION = (
    "img/s: training pass, after the first epoch when there are several; mAP: mAP50-95 of the stage's best weights "
    "at its own size, @640: at 640 px"
)
CURVE_POINTS = 10  # epochs listed in a stage's accuracy line (evenly spaced, the last always); the PNG has them all


def render_hardware(hw: HardwareSnapshot) -> RenderableType:
    table = Table(title="Hardware", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for g in hw.gpus:
        table.add_row(f"GPU {g.index}", f"{g.name}: {g.free_vram_gb:.1f} of {g.total_vram_gb:.1f} GB free")
    if not hw.gpus:
        table.add_row("GPU", "none (CPU training)")
    table.add_row("RAM", f"{hw.ram_available_gb:.1f} of {hw.ram_total_gb:.1f} GB available")
    if hw.swap_total_gb:
        table.add_row("Swap", f"{hw.swap_free_gb:.1f} of {hw.swap_total_gb:.1f} GB free")
    table.add_row("CPU", f"{hw.cpu_cores_physical} physical / {hw.cpu_cores_logical} logical cores")
    table.add_row("Disk", f"{hw.disk_free_gb:.1f} GB free")
    if hw.versions:
        table.add_row("Software", ", ".join(f"{name} {version}" for name, version in hw.versions))
    for note in hw.notes:
        table.add_row("Note", note)
    return table


def render_dataset(ds: DatasetSummary) -> RenderableType:
    sampled = f" (sampled {ds.sample_size})" if ds.sampled else ""
    lines = [
        f"{ds.train_images} train / {ds.val_images} val images, {ds.classes} classes, "
        f"{ds.background_images} backgrounds",
        f"image long side: median {ds.median_long_side} px, max {ds.max_long_side} px{sampled}",
    ]
    errors = sum(p.severity == "error" for p in ds.problems)
    if ds.problems:
        n = len(ds.problems)
        lines.append(f"{_plural(n, 'problem')} ({_plural(errors, 'error')}); `speedtrain check` lists them")
    lines += ds.notes
    return Panel("\n".join(lines), title="Dataset", title_align="left")


def render_plan(plan: TrainPlan) -> RenderableType:
    """The plan against the untuned baseline, knob by knob, with the reasons."""
    reasons, base = dict(plan.reasons), plan.baseline
    main = plan.stages[0]
    table = Table(title=f"Plan: {plan.model} on {plan.device}", title_justify="left", expand=False)
    table.add_column("knob", style="bold")
    table.add_column("baseline")
    table.add_column("plan", style="green")
    table.add_column("why", overflow="fold", ratio=1)
    for knob, baseline, cell, keys in knobs.table_rows():  # declared once, in speedtrain/knobs.py
        why = next((reasons[k] for k in keys if reasons.get(k)), "")
        table.add_row(knob, str(base.get(knob, baseline)), str(cell(main)), why)
    for key, value in main.extra:
        if key == "time" and reasons.get("time"):  # --time: the run's budget, shared between the stages
            table.add_row(key, "", f"{value} h", reasons["time"])
        else:
            table.add_row(key, "", str(value), "set by user")
    parts: list[RenderableType] = [table]
    if main.schedule is not None:
        parts.append(render_phases(main.schedule, reasons.get("time", "")))
    if reasons.get("device"):
        parts.append(Text(f"device: {reasons['device']}"))
    parts.append(Text(f"prepare: {reasons.get('prepare', 'off')}"))
    parts.append(Text(f"fine-tune: {reasons.get('finetune', 'off')}"))
    if len(plan.stages) > 1:
        ft = plan.stages[1]
        parts.append(
            Text(
                f"  {ft.epochs} epochs at {ft.imgsz}, batch {ft.batch}, {ft.optimizer} lr0 {ft.lr0}, "
                f"cache {ft.cache or 'none'}"
            )
        )
    if plan.estimates:
        parts.append(Text("Estimated factors (not measured):", style="bold"))
        parts += [Text(f"  {k}: {v}") for k, v in plan.estimates]
    parts += [Text(f"warning: {w}", style="yellow") for w in plan.warnings]
    return Group(*parts)


def render_phases(schedule: Schedule, why: str) -> RenderableType:
    """A budgeted run's phases: each one's size, share and time of the budget, and the learning rate at its ends."""
    table = Table(title=f"Phases: {duration(schedule.budget_s)} (--time)", title_justify="left", expand=False)
    for column in ("phase", "image size", "share of the budget", "from", "learning rate (x peak)"):
        table.add_column(column)
    at = 0.0
    for i, (size, share, lr_start, lr_end) in enumerate(schedule.rows(), 1):
        peak = " -> 1.00" if at <= schedule.warmup < at + share else ""  # the warmup ends in this phase
        table.add_row(
            str(i),
            f"{size} px",
            f"{share:.0%}",
            duration(at * schedule.budget_s),
            f"{lr_start:.2f}{peak} -> {lr_end:.2f}",
        )
        at += share
    notes = Text(
        f"warmup {schedule.warmup:.0%} of the budget; mosaic off for its last {schedule.close_mosaic:.0%}; the "
        "epochs of each phase are fitted at run time from the measured pace; validated at the deadline, at "
        f"{schedule.final_imgsz} px (its time kept in reserve)"
    )
    return Group(table, notes)


def render_planned(rep: SpeedReport) -> RenderableType:
    """A plan with the machine and dataset it was made for (`speedtrain plan`)."""
    return Group(render_hardware(rep.hardware), render_dataset(rep.dataset), render_plan(rep.plan))


def render_report(rep: SpeedReport, with_plan: bool = True) -> RenderableType:
    """The whole speed report: hardware, dataset, plan (unless it was just shown), and what each stage measured."""
    parts: list[RenderableType] = [render_hardware(rep.hardware)]
    if with_plan:
        parts += [render_dataset(rep.dataset), render_plan(rep.plan)]
    parts.append(render_measured(rep))
    run = rep.run
    if run:
        parts.append(Text(run.model_note))
        if run.status == "running":  # the report of a run that was killed or crashed: it never finished
            line = f"Run stopped before it finished (killed or crashed): go on with {said('resume', run.run_dir)}"
        else:
            line = f"Run {run.status} in {duration(run.wall_time_s or 0)}{final_accuracy(rep)}: {run.run_dir}"
        parts.append(Text(line, style="bold"))
    return Group(*parts)


def render_resize(summary: ResizeSummary) -> RenderableType:
    """The summary of one `speedtrain prepare` run."""
    s = summary
    table = Table(title=f"Resized to {s.size} px: {s.out_dir}", title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rate = s.images_per_s
    rows = [
        ("images", s.images),
        ("resized", s.resized),
        ("copied (already small)", s.copied),
        ("unchanged since last run", s.unchanged),
        ("failed (skipped)", len(s.failed)),
        ("labels copied", s.labels_copied),
        ("removed (source gone)", s.removed),
        ("MB before -> after", f"{s.bytes_before / 1e6:.1f} -> {s.bytes_after / 1e6:.1f}"),
        ("JPEG/WebP quality", ", ".join(f"{q} ({n} images)" for q, n in s.qualities) or "-"),
        ("time", f"{s.seconds:.2f} s"),
        ("images/s", f"{rate:.1f} ({s.workers} processes)" if rate else "-"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return Group(table, *[Text(f"failed: {p.line()}", style="yellow") for p in s.failed])


def render_prepared(record: Preparation) -> RenderableType:
    """What pre-resizing cost and saved, in a training report."""
    s = record.summary
    lines = [
        record.decision,
        f"{s.resized + s.copied} images written in {s.seconds:.1f} s "
        f"({s.unchanged} unchanged since an earlier run), {s.bytes_before / 1e6:.1f} -> "
        f"{s.bytes_after / 1e6:.1f} MB"
        + (f" (JPEG quality {'/'.join(str(q) for q, _ in s.qualities)})" if s.qualities else ""),
    ]
    if record.load_ms_original and record.load_ms_prepared and record.saving_s_per_epoch is not None:
        lines.append(
            f"loading one image: {record.load_ms_original:.1f} ms original vs {record.load_ms_prepared:.1f} ms "
            f"prepared (median of {record.load_sample} images, one process): about "
            f"{record.saving_s_per_epoch:.1f} s of loading saved "
            + ("per run (the RAM cache loads each image once)" if record.ram_cache else "per epoch")
            + " (estimate)"
        )
    failed = s.failed
    lines += [f"skipped (unreadable: not in the copy, not trained on): {f.line()}" for f in failed[:10]]
    if len(failed) > 10:
        lines.append(f"... and {len(failed) - 10} more skipped (the report's prepare.summary.failed lists all)")
    return Panel("\n".join(lines), title="Preparation", title_align="left")


def render_tune(t: TuneResult) -> RenderableType:
    """What `speedtrain tune` measured, what it chose and why."""
    steps = Table(title="Model step (batches already on the device)", title_justify="left")
    for col in ("batch", "img/s", "+-", "peak GB"):
        steps.add_column(col, justify="right")
    for s in t.steps:
        rate = "out of memory" if s.oom else _num(s.images_per_s, "{:.1f}")
        steps.add_row(str(s.batch), rate, _pct(s.rel_err), _num(s.peak_mem_gb, "{:.1f}"))
    loaders = Table(title="Training dataloader (augmentation included, no model)", title_justify="left")
    for col in ("workers", "cache", "img/s", "+-", "peak RAM GB"):
        loaders.add_column(col, justify="right")
    for x in t.loaders:
        loaders.add_row(
            str(x.workers), str(x.cache or "none"), f"{x.images_per_s:.1f}", _pct(x.rel_err), f"{x.peak_ram_gb:.1f}"
        )
    achieved, plan_achieved = t.achieved_images_per_s, t.plan_achieved_images_per_s
    lines = [
        f"choice: batch {t.batch}, {t.workers} workers, cache {t.cache or 'none'}"
        + (" (the plan's)" if t.kept_plan else "")
        + f": {t.predicted_images_per_s} img/s predicted"
        + (f", {achieved} img/s achieved in a short real run" if achieved else ""),
        *(
            [f"the plan's configuration in the same run: {plan_achieved} img/s"]
            if plan_achieved is not None and not t.kept_plan
            else []
        ),
        *t.diagnosis,
        ("reused the measurement of " if t.cached else "measured in ")
        + (t.created_at if t.cached else f"{t.elapsed_s} s of a {t.budget_s:.0f} s budget"),
    ]
    return Group(steps, loaders, Panel("\n".join(lines), title="Tune", title_align="left"))


def render_problems(problems: Sequence[Problem], limit: int = 10) -> RenderableType:
    """Problems grouped by kind, with up to `limit` file names each."""
    if not problems:
        return Text("no problems found", style="green")
    kinds: dict[str, list[Problem]] = {}
    for p in problems:
        kinds.setdefault(p.kind, []).append(p)
    parts: list[RenderableType] = []
    for kind, items in kinds.items():
        style = "red" if items[0].severity == "error" else "yellow"
        parts.append(Text(f"{kind}: {len(items)} ({items[0].severity})", style=f"bold {style}"))
        parts += [Text(f"  {p.file}: {p.detail}") for p in items[:limit]]
        if len(items) > limit:
            parts.append(Text(f"  ... and {len(items) - limit} more (--json lists all)"))
    return Group(*parts)


def render_measured(rep: SpeedReport) -> RenderableType:
    table = Table(title="Measured on this machine", title_justify="left", caption=MEASURED_CAPTION)
    for col in ("stage", "epochs", "batch", "epoch s", "img/s", "GPU %", "GPU GB", "mAP", "@640"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    notes = []
    for s in rep.stages:
        name, m = s.stage.name, s.measured
        if not m:
            table.add_row(name, s.status, "-", "-", "-", "-", "-", "-", "-")
            if s.note:
                notes.append(f"{name}: {s.note}")
            continue
        times = m.epoch_times_s
        table.add_row(
            name,
            f"{m.epochs_done}" if s.stage.schedule else f"{m.epochs_done}/{s.stage.epochs}",
            str(m.batch),
            f"{statistics.fmean(times):.1f}" if times else "-",
            _num(m.images_per_s_steady or m.images_per_s, "{:.1f}"),
            _num(m.gpu_util_mean, "{:.0f}"),
            _num(m.gpu_mem_peak_gb, "{:.1f}"),
            *(
                ("-", "-")
                if rep.no_metrics
                else (_num(m.metric("mAP50-95"), "{:.3f}"), _num(m.score_at(640), "{:.3f}"))
            ),
        )
        notes += stage_notes(s, bool(rep.no_metrics))
    if rep.no_metrics:
        notes.insert(0, rep.no_metrics)
    return Group(table, *[Text(n) for n in notes])


def stage_notes(s: StageReport, no_metrics: bool = False) -> list[str]:
    """The lines under the measured table for one stage that ran: its learning, validation cadence, time estimate,
    out-of-memory steps, threads and CPU, ranks, fast-pipeline store, inference latency and weights."""
    name, m = s.stage.name, s.measured
    assert m is not None
    notes = _learning_notes(s, m, no_metrics)
    notes += [
        f"{name}: out of memory at batch {oom.from_batch}, continued with {oom.to_batch} (epoch {oom.epoch}, {oom.at})"
        for oom in m.oom_fallbacks
    ]
    if s.note:  # interrupted, a limit that ended it, a final validation that failed
        notes.append(f"{name}: {s.note}")
    if m.threads or m.cpu_util_mean is not None:
        threads = f"{m.threads} torch threads, " if m.threads else ""
        notes.append(f"{name}: {threads}CPU busy {_num(m.cpu_util_mean, '{:.0f}')} % (all cores)")
    notes.extend(rank_notes(name, m))
    if m.fast_store:
        where = "read into RAM" if m.fast_store == "ram" else "memory-mapped from disk"
        notes.append(f"{name}: fast pipeline store {where}")
    if m.latency_ms:
        at = ", ".join(f"{ms:.1f} ms at {size}" for size, ms in m.latency_ms)
        notes.append(f"{name}: inference {at} px (batch 1, on {s.stage.device.split(',')[0]}, median; network alone)")
    if m.weights:
        notes.append(f"{name} weights: {m.weights}")
    return notes


def _learning_notes(s: StageReport, m: StageResult, no_metrics: bool) -> list[str]:
    """A stage's accuracy by epoch, its phases (or validation cadence) and its time estimate."""
    name, notes = s.stage.name, []
    if m.epoch_map50_95 and not no_metrics:
        notes.append(accuracy_line(name, m.epoch_map50_95, m.epoch_loss, s.stage.imgsz, m.epoch_validated))
    if m.phase_log and s.stage.schedule:
        notes.append(schedule_line(name, m.phase_log, s.stage.schedule.budget_s))
    elif m.val_every > 1 or m.epoch_validated:
        notes.append(cadence_line(name, m, s.stage.val_every))
    if m.estimated_epoch_s and m.train_times_s:
        notes.append(estimate_line(name, m))
    return notes


def accuracy_line(
    name: str, maps: Sequence[float], losses: Sequence[float], imgsz: int, epochs: Sequence[int] = ()
) -> str:
    """A stage's learning in one line: mAP50-95 at some epochs (its training-time validation) and the loss;
    `epochs` numbers the scores when not every epoch was validated."""
    number = list(epochs) if len(epochs) == len(maps) else list(range(1, len(maps) + 1))
    shown = ", ".join(f"{number[i]}: {maps[i]:.3f}" for i in spread(len(maps), CURVE_POINTS))
    loss = f"; training loss {losses[0]:.2f} -> {losses[-1]:.2f}" if len(losses) > 1 else ""
    return f"{name}: mAP50-95 at {imgsz} px by epoch {shown}{loss}"


def cadence_line(name: str, m: StageResult, planned: int) -> str:
    """How often a stage validated (--val-every), what validating cost and what skipping saved (an estimate)."""
    how = "auto" if planned == 0 else "set"
    validated = len(m.epoch_validated) if m.epoch_validated else len(m.epoch_map50_95)
    cost = f"; validating took {m.val_time_s:.0f} s" if m.val_time_s else ""
    saved = f", skipping saved about {m.val_saved_s:.0f} s (estimate)" if m.val_saved_s else ""
    return f"{name}: validated {validated} of {m.epochs_done} epochs (every {m.val_every}, {how}){cost}{saved}"


def schedule_line(name: str, log: Sequence[dict[str, Any]], budget_s: float) -> str:
    """A budgeted stage's phases as they ran: each size's epochs and learning rate (x its peak), where mosaic closed,
    and where the training ended against the deadline."""
    parts, start = [], 0
    for i, e in enumerate(log):
        if i + 1 == len(log) or log[i + 1]["imgsz"] != e["imgsz"]:
            first, last = log[start], e
            epochs = f"epoch {first['epoch']}" if first is last else f"epochs {first['epoch']}-{last['epoch']}"
            parts.append(f"{e['imgsz']} px {epochs} (lr {first['lr_start']:.2f}->{last['lr_end']:.2f})")
            start = i + 1
    closed = next((e["epoch"] for e in log if not e["mosaic"]), None)
    mosaic = f"; mosaic off from epoch {closed}" if closed else ""
    end = log[-1]["end_s"]
    return (
        f"{name}: {', '.join(parts)}{mosaic}; training ended at {duration(end)} of its {duration(budget_s)} "
        "deadline, the last epoch validated"
    )


def estimate_line(name: str, m: StageResult) -> str:
    """The time estimate printed while the stage's first epoch ran, beside what was measured."""
    measured, estimated = statistics.fmean(m.train_times_s), m.estimated_epoch_s or 0.0
    off = (measured - estimated) / estimated if estimated else 0.0
    return (
        f"{name}: an epoch's training pass, estimated {m.estimated_epoch_s:.1f} s from the first "
        f"{m.estimated_from_batches} batches; measured {measured:.1f} s (mean of {len(m.train_times_s)}, "
        f"{off:+.0%})"
    )


def final_accuracy(rep: SpeedReport) -> str:
    """', the model's mAP50-95 0.412 at 640 px, 0.398 at 416 px' for the run's final line; '' when unmeasured."""
    scores = sorted(rep.final_scores(), key=lambda s: -s[0])
    if rep.no_metrics:
        return f", {rep.no_metrics}"
    if not scores:
        return ""
    return ", the model's mAP50-95 " + ", ".join(f"{value:.3f} at {size} px" for size, value in scores)


def epoch_line(ev: StageProgress) -> str:
    """One line for a finished epoch (a log, or a rank's console): stage, epoch, images/s, last mAP50-95."""
    rate = f"{ev.images_per_s} img/s" if ev.images_per_s else "-"
    score = f"mAP50-95 {ev.map50_95:.3f}" if ev.map50_95 is not None else ""
    return f"{ev.stage}: epoch {ev.epoch + 1}/{ev.epochs}  {rate}  {score}".rstrip()


def batch_line(ev: StageProgress, elapsed_s: float) -> str:
    """A line during an epoch, for logs: batch k/n, the last epoch's images/s and an estimate of the epoch's rest."""
    rate = f", {ev.images_per_s} img/s last epoch" if ev.images_per_s else ""
    left = elapsed_s * (1 - ev.fraction) / ev.fraction if ev.fraction > 0 and elapsed_s >= 1 else None
    eta = f", about {duration(left)} left in this epoch (estimate)" if left is not None else ""
    where = f"batch {ev.batch}/{ev.batches}" if ev.batches else f"{ev.fraction:.0%}"
    return f"{ev.stage}: epoch {ev.epoch + 1}/{ev.epochs} {where}{rate}{eta}"


SHOWN_RANKS = 8  # ranks listed one by one; more are summarised as slowest, median, fastest


def rank_notes(name: str, m: StageResult) -> list[str]:
    """A multi-rank stage: the total, each rank's own images/s (where it ran), and the slowest rank named when it
    held the others back (every rank waits for the slowest at each step)."""
    ranks = [r for r in m.ranks if r.images_per_s]
    if len(ranks) < 2:
        return []
    rate = {r.rank: r.images_per_s or 0.0 for r in ranks}
    rates = sorted(rate.values())
    total = f"{_num(m.images_per_s_steady or m.images_per_s, '{:.1f}')} img/s in all"
    if len(ranks) <= SHOWN_RANKS:
        each = "; ".join(
            f"rank {r.rank} {r.images_per_s:.1f} ({r.node} {r.device}"
            + (f", GPU {r.gpu_util_mean:.0f} %" if r.gpu_util_mean is not None else "")
            + (f", {r.gpu_mem_peak_gb:.1f} GB" if r.gpu_mem_peak_gb is not None else "")
            + ")"
            for r in ranks
        )
    else:
        each = f"slowest {rates[0]:.1f}, median {statistics.median(rates):.1f}, fastest {rates[-1]:.1f}"
    lines = [f"{name}: {len(ranks)} ranks, {total}; img/s per rank: {each}"]
    slowest = min(ranks, key=lambda r: rate[r.rank])
    if rates[-1] > 0 and rate[slowest.rank] < SLOW_RANK * rates[-1]:
        lines.append(
            f"{name}: rank {slowest.rank} ({slowest.node} {slowest.device}) ran at "
            f"{rate[slowest.rank] / rates[-1]:.0%} of the fastest rank: every step waits for it"
        )
    return lines


SLOW_RANK = 0.9  # a rank under 90 % of the fastest one's images/s is named as the bottleneck


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(rel_err: float | None) -> str:
    """A relative standard error as a percentage; '-' where it was not measured."""
    return "-" if not rel_err else f"{rel_err:.0%}" if rel_err >= 0.01 else "<1%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


PNG_NAME = "speed_report.png"
PNG_SIZE_IN, PNG_DPI = (16.0, 4.5), 100  # 1600 x 450 pixels


def save_png(rep: SpeedReport, path: str | Path) -> Path:
    """Write the speed report's picture: per-epoch time, images/s and accuracy per stage, and the plan against the
    baseline: speed and accuracy in one picture."""
    from matplotlib.figure import Figure  # matplotlib comes with Ultralytics; imported only when a PNG is made

    measured = [(s.stage.name, s.measured) for s in rep.stages if s.measured]
    phased = [(s.stage, s.measured) for s in rep.stages if s.measured and s.measured.phase_log and s.stage.schedule]
    size = (PNG_SIZE_IN[0] * 1.25, PNG_SIZE_IN[1]) if phased else PNG_SIZE_IN
    fig = Figure(figsize=size, dpi=PNG_DPI, layout="constrained")
    ratios = [1, 1, 1.1, 1.15] + ([1.1] if phased else [])
    ax_time, ax_rate, ax_map, ax_plan, *ax_schedule = fig.subplots(1, len(ratios), width_ratios=ratios)
    for (stage, m), ax in zip(phased[:1], ax_schedule, strict=False):
        _schedule_panel(ax, stage, m)
    ax_loss = ax_map.twinx()
    offset = 0  # stages share one epoch axis: the run as a timeline
    for name, m in measured:
        offset = _stage_lines((ax_time, ax_rate, ax_map, ax_loss), name, m, offset)
    _style(ax_time, "Seconds per epoch", "epoch of the run", "s", offset)
    _style(ax_rate, "Training images per second", "epoch of the run", "images/s", offset)
    _style(
        ax_map, "Accuracy: mAP50-95 (line), loss (dotted)", "epoch of the run", "mAP50-95 at the stage's size", offset
    )
    ax_loss.set_ylim(bottom=0)
    ax_loss.set_ylabel("training loss", fontsize=8)
    if not measured:
        ax_time.text(0.5, 0.5, "no stage ran", ha="center", transform=ax_time.transAxes)
    _plan_table(ax_plan, rep)
    gpus = ", ".join(g.name for g in rep.hardware.gpus) or "CPU only"
    fig.suptitle(f"speedtrain: {rep.plan.model} on {rep.dataset.name}, {gpus}{final_accuracy(rep)}", fontsize=11)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=PNG_DPI)
    tmp.replace(path)
    return path


def _stage_lines(axes: tuple[Any, Any, Any, Any], name: str, m: StageResult, offset: int) -> int:
    """One stage's epochs on the run's timeline (after `offset` epochs): seconds, images/s, mAP and loss; return
    the timeline's last epoch."""
    ax_time, ax_rate, ax_map, ax_loss = axes
    epochs = list(range(offset + 1, offset + len(m.epoch_times_s) + 1))
    ax_time.plot(epochs, m.epoch_times_s, marker="o", label=f"{name}: whole epoch")
    train = m.train_times_s
    if train:  # after a kill and --resume, the epochs before it have whole-epoch times only: align to the end
        timed = epochs[len(epochs) - len(train) :]
        ax_time.plot(timed, train, marker=".", linestyle="--", label=f"{name}: training pass")
        rates = [m.images_per_epoch / t if t > 0 else 0 for t in train]
        ax_rate.plot(timed, rates, marker="o", label=f"{name}: all ranks" if m.ranks else name)
        _rank_lines(ax_rate, name, m)
    _accuracy_lines(ax_map, ax_loss, name, m, epochs)
    if offset:
        for ax in (ax_time, ax_rate, ax_map):
            ax.axvline(offset + 0.5, color="grey", linewidth=0.8)
    return epochs[-1] if epochs else offset


def _accuracy_lines(ax_map: Any, ax_loss: Any, name: str, m: StageResult, epochs: list[int]) -> None:
    """A stage's mAP50-95 per epoch and its training loss (dotted, right axis), aligned to the run's last epochs
    (results.csv has one row per epoch; after a resume, the epochs it kept)."""
    maps, losses = m.epoch_map50_95, m.epoch_loss
    if not maps or not epochs:
        return
    if m.epoch_validated:  # --val-every: the epochs that were validated, of the stage's last ones
        at = [epochs[min(v, len(epochs)) - 1] for v in m.epoch_validated]
    else:
        at = epochs[max(0, len(epochs) - len(maps)) :][-len(maps) :]
    line = ax_map.plot(at, maps[-len(at) :], marker="o", label=f"{name} at {m.imgsz} px")[0]
    if losses:
        ax_loss.plot(at, losses[-len(at) :], linestyle=":", color=line.get_color(), label=f"{name} loss")


def _schedule_panel(ax: Any, stage: Any, m: StageResult) -> None:
    """A budgeted stage's schedule on its training clock: the learning rate (x its peak) and the image size of each
    epoch, the phase boundaries and the deadline."""
    log, budget_min = m.phase_log, stage.schedule.budget_s / 60
    xs = [x for e in log for x in (e["start_s"] / 60, e["end_s"] / 60)]
    ax.plot(xs, [y for e in log for y in (e["lr_start"], e["lr_end"])], color="tab:blue", label="learning rate")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("learning rate (x peak)")
    sizes = ax.twinx()
    sizes.step(
        [e["start_s"] / 60 for e in log] + [log[-1]["end_s"] / 60],
        [e["imgsz"] for e in log] + [log[-1]["imgsz"]],
        where="post",
        color="tab:orange",
        label="image size",
    )
    sizes.set_ylabel("image size (px)", fontsize=8)
    for before, e in zip(log, log[1:], strict=False):
        if e["imgsz"] != before["imgsz"]:
            ax.axvline(e["start_s"] / 60, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(budget_min, color="tab:red", linewidth=1.2, label="deadline")
    ax.set_xlim(0, budget_min * 1.03)
    ax.set_xlabel("minutes of training")
    ax.set_title("Schedule: phases and learning rate", fontsize=10)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + sizes.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")


def _rank_lines(ax: Any, name: str, m: StageResult) -> None:
    """Each rank's own images/s as a dotted level (the slowest and fastest only, when there are many)."""
    ranks = sorted((r for r in m.ranks if r.images_per_s), key=lambda r: r.images_per_s or 0.0)
    if len(ranks) < 2:
        return
    shown = ranks if len(ranks) <= SHOWN_RANKS else [ranks[0], ranks[-1]]
    for r in shown:
        ax.axhline(r.images_per_s, linestyle=":", linewidth=1, color="grey")
        ax.annotate(
            f"{name} rank {r.rank}",
            (0.01, r.images_per_s),
            xycoords=("axes fraction", "data"),
            fontsize=6,
            va="bottom",
            color="grey",
        )


def _style(ax: Any, title: str, xlabel: str, ylabel: str, epochs: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_xlim(0.5, max(epochs, 1) + 0.5)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _plan_table(ax: Any, rep: SpeedReport) -> None:
    """Baseline vs plan, knob by knob; estimates are labelled as such."""
    base, main = rep.plan.baseline, rep.plan.stages[0]
    m = rep.main.measured if rep.stages else None
    rows = [
        ["image size", base["imgsz"], knobs.table_cell("imgsz", main)],
        ["batch", base["batch"], m.batch if m else main.batch],
        ["cache", base["cache"], main.cache or "none"],
        ["workers", base["workers"], main.workers],
        ["rect / lr decay", "False / linear", f"{main.rect} / {'linear to 0' if main.schedule else 'cosine'}"],
        ["optimizer", "auto", main.optimizer],
    ]
    if m and m.images_per_s:
        rows.append(["measured img/s", "not run", f"{m.images_per_s_steady or m.images_per_s:.1f}"])
    ax.axis("off")
    table = ax.table(
        cellText=[[str(c) for c in r] for r in rows], colLabels=["knob", "baseline", "plan"], loc="upper center"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title("Plan vs untuned baseline", fontsize=10)
    notes = [textwrap.fill(f"{k}: {v}", 62) for k, v in rep.plan.estimates]
    ax.text(0, 0.0, "\n".join(notes), fontsize=7, transform=ax.transAxes, va="bottom")


def render_comparison(c: Comparison, saved: Path) -> RenderableType:
    """A comparison: per arm its size, batch, epochs, images/s, final mAP at each size, latency and wall time; then
    each arm's time to the baseline's accuracy, and the notes."""
    title = f"compare: {c.model} on {c.device}, {c.budget_s:.0f} s per arm"
    if c.baseline_budget_s and c.baseline_budget_s != c.budget_s and c.arm("defaults"):
        title += f" ({c.baseline_budget_s:.0f} s for the defaults)"
    caption = "mAP@N: the final weights' mAP50-95 at N px; ms@640: latency, batch 1"
    table = Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=None,
        padding=(0, 1),
        pad_edge=False,
        header_style="bold underline",
    )
    table.add_column("arm", no_wrap=True, min_width=max(len(a.name) for a in c.arms) if c.arms else 3)
    for col in ("size", "batch", "epochs", "img/s", *[f"mAP@{s}" for s in c.val_sizes], "ms@640", "wall s"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for a in c.arms:
        finals = [a.final_at(s) for s in c.val_sizes]
        latency = dict(a.latency_ms).get(640)
        table.add_row(
            a.name,
            a.size,
            str(a.batch),
            str(a.epochs_done),
            _num(a.images_per_s, "{:.1f}"),
            *[fmt_map(f.map50_95) if f else "-" for f in finals],
            _num(latency, "{:.1f}"),
            f"{a.wall_s:.0f}",
        )
    lines = [Text(c.time_to_accuracy(a.name).line, style="bold") for a in c.arms if a.name != "defaults"]
    lines += [Text(e.line) for e in (c.equal_budget(a.name) for a in c.arms if a.name != "defaults") if e]
    return Group(table, *lines, *[Text(n) for n in _comparison_notes(c)], Text(f"saved: {saved}"))


def _comparison_notes(c: Comparison) -> list[str]:
    """The lines under a comparison's table: each arm's note, what did not run, how the curves were measured."""
    notes = [f"{a.name}: {a.note}" for a in c.arms if a.note]
    missing = [n for n in c.requested if c.arm(n) is None]
    if missing:
        notes.append(f"not run (interrupted before them): {', '.join(missing)}")
    if c.prepare_s:
        notes.append(f"plan arms' clocks include {c.prepare_s:.1f} s of pre-resizing the dataset")
    notes.append(
        f"curves: every saved epoch validated afterwards at {c.val_imgsz} px (not counted in the budget); "
        "latency: the trained network's forward pass on the training device"
    )
    return notes


def save_comparison_png(c: Comparison, path: Path) -> Path:
    """mAP50-95 against wall-clock seconds, every arm on one axis, the baseline's target as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for a in c.arms:
        if a.curve:
            ax.plot([p.seconds for p in a.curve], [p.map50_95 for p in a.curve], marker="o", label=a.name)
    tta = c.time_to_accuracy("plan")
    if tta.target:
        ax.axhline(tta.target, color="grey", linestyle="--", linewidth=0.8, label="baseline's final mAP50-95")
    ax.set_xlabel("wall-clock seconds since the arm started")
    ax.set_ylabel(f"mAP50-95 at {c.val_imgsz} px")
    ax.set_title(f"Time to accuracy: {c.model}, {c.budget_s:.0f} s per arm", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


# --- a stage's time estimate, said once in its first epoch ----------------------------------------------------------


def first_epoch_estimate(
    stage: str,
    epoch_s: float,
    batches: int,
    epochs: int,
    budget_s: float,
    baseline_factor: float,
    later: tuple[tuple[str, int, float, bool], ...],
    max_epochs: int | None,
) -> str:
    """The stage's time estimate from its measured first `batches`: the `epochs` left at `epoch_s` each (with
    --time, how many fit its `budget_s`, at most `max_epochs`); the untuned baseline's at Ultralytics' 640 px
    (`baseline_factor`: its pixels against the stage's) and each `later` stage's (name, epochs, pixels ratio,
    whether it may be skipped), all as estimates: time ~ pixels."""
    measured = f"{epoch_s:.1f} s each; estimate from the first {batches} batches, validation not included"
    if budget_s:
        limit = f"; at most {max_epochs} (the epoch limit)" if max_epochs else ""
        fit = max(1, int(budget_s // epoch_s))
        return f"{stage}: about {fit} epochs' training passes fit its {duration(budget_s)} ({measured}){limit}"
    words = f"{stage}: about {duration(epoch_s * epochs)} for {epochs} epochs' training passes ({measured})"
    if baseline_factor:
        words += (
            f"; at Ultralytics' 640 px about {duration(epoch_s * epochs * baseline_factor)} (estimate: time ~ pixels)"
        )
    for name, n, ratio, maybe in later:  # the whole run: later stages at their own image size
        words += (
            f"; then {name}{' (if it runs)' if maybe else ''} about {duration(epoch_s * ratio * n)} for {n} epochs "
            "(estimate: time ~ pixels)"
        )
    return words
