"""Build speed_report.json from plan + result, and render it (and probes and plans) as rich renderables."""

from __future__ import annotations

import copy
import json
import statistics
import textwrap
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from speedtrain import hardware
from speedtrain.dataset import DatasetStats
from speedtrain.errors import SpeedtrainError
from speedtrain.hardware import JSON_MAX_BYTES, HardwareSnapshot
from speedtrain.planner import TrainPlan
from speedtrain.runner import RunResult, StageResult
from speedtrain.util import utc_now, write_atomic

REPORT_NAME = "speed_report.json"
REPORT_VERSION = 1
MEASURED_CAPTION = "img/s: training pass, after the first epoch when there are several"


def dataset_summary(stats: DatasetStats) -> dict[str, Any]:
    """The dataset block of plan and report JSON."""
    sizes = stats.image_sizes
    return {
        "yaml_path": stats.yaml_path,
        "root": stats.root,
        "train_images": stats.train_images,
        "val_images": stats.val_images,
        "label_files": stats.label_files,
        "background_images": stats.background_images,
        "classes": stats.classes,
        "image_size": {
            "median_long_side": sizes.median_long_side(),
            "max_long_side": sizes.max_long_side(),
            "sampled": sizes.sampled,
            "sample_size": len(sizes.dims),
        },
        "problems": [
            {"severity": p.severity, "kind": p.kind, "file": p.file, "detail": p.detail} for p in stats.problems
        ],
        "notes": list(stats.notes),
    }


def plan_document(hw: HardwareSnapshot, stats: DatasetStats, plan: TrainPlan) -> dict[str, Any]:
    """What `speedtrain plan --json` prints: the plan with the hardware and dataset it was made for."""
    return {**plan.to_dict(), "hardware": hardware.to_dict(hw), "dataset": dataset_summary(stats)}


def build_report(
    base: dict[str, Any],
    results: tuple[StageResult, ...],
    running: str | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The speed_report.json document: the plan document `base`, and per stage its status and measured figures.

    Written when a run starts, after every stage and at the end; a stage not reached is "pending", the one
    training is "running" (what `--resume` looks for after a crash).
    """
    doc = copy.deepcopy(base)
    by_name = {r.name: r for r in results}
    for stage in doc["stages"]:
        res = by_name.get(stage["name"])
        stage["status"] = res.status if res else ("running" if stage["name"] == running else "pending")
        stage["note"] = res.note if res else ""
        stage["measured"] = res.measured() if res and res.status != "skipped" else None
    doc["run"] = {"version": REPORT_VERSION, **doc.get("run", {}), **(run or {})}
    return doc


def run_info(result: RunResult) -> dict[str, Any]:
    """The `run` block's fields that only a finished (or interrupted) run knows."""
    return {
        "run_dir": result.run_dir,
        "model_source": result.model_source,
        "model_note": result.model_note,
        "started_at": result.started_at,
        "finished_at": utc_now(),
        "wall_time_s": result.wall_time_s,
        "interrupted": result.interrupted,
        "status": "interrupted" if result.interrupted else "finished",
    }


def save_report(doc: dict[str, Any], run_dir: str | Path) -> Path:
    path = Path(run_dir) / REPORT_NAME
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """Read a run folder's speed_report.json (or the file itself)."""
    path = Path(run_dir)
    path = path / REPORT_NAME if path.is_dir() else path
    try:
        if path.stat().st_size > JSON_MAX_BYTES:
            raise SpeedtrainError(f"{path}: too large for a speed report (over {JSON_MAX_BYTES // 1024**2} MB)")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpeedtrainError(f"no {REPORT_NAME} in {path.parent}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SpeedtrainError(f"{path}: cannot read report ({exc})") from None
    if not isinstance(doc, dict) or "stages" not in doc:
        raise SpeedtrainError(f"{path}: not a speedtrain speed report")
    return doc


def check_report(doc: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The report's shape, checked before anything renders or resumes it: one line instead of a KeyError."""
    path = Path(run_dir)
    path = path / REPORT_NAME if path.is_dir() else path
    shape = {"stages": list, "reasons": dict, "baseline": dict, "hardware": dict, "dataset": dict}
    wrong = [k for k, kind in shape.items() if not isinstance(doc.get(k), kind)]
    stages = doc["stages"] if isinstance(doc["stages"], list) else []
    if wrong or not stages or not all(isinstance(s, dict) and {"name", "imgsz", "epochs"} <= set(s) for s in stages):
        what = ", ".join(wrong) if wrong else "stages"
        raise SpeedtrainError(f"{path}: not a complete speedtrain speed report ({what} missing or malformed)")
    return doc


def render_hardware(hw: dict[str, Any]) -> RenderableType:
    table = Table(title="Hardware", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for g in hw["gpus"]:
        table.add_row(f"GPU {g['index']}", f"{g['name']}: {g['free_vram_gb']:.1f} of {g['total_vram_gb']:.1f} GB free")
    if not hw["gpus"]:
        table.add_row("GPU", "none (CPU training)")
    table.add_row("RAM", f"{hw['ram_available_gb']:.1f} of {hw['ram_total_gb']:.1f} GB available")
    if hw.get("swap_total_gb"):
        table.add_row("Swap", f"{hw.get('swap_free_gb', 0):.1f} of {hw['swap_total_gb']:.1f} GB free")
    table.add_row("CPU", f"{hw['cpu_cores_physical']} physical / {hw['cpu_cores_logical']} logical cores")
    table.add_row("Disk", f"{hw['disk_free_gb']:.1f} GB free")
    for note in hw.get("notes", []):
        table.add_row("Note", note)
    return table


def render_dataset(ds: dict[str, Any]) -> RenderableType:
    size = ds["image_size"]
    sampled = f" (sampled {size['sample_size']})" if size["sampled"] else ""
    lines = [
        f"{ds['train_images']} train / {ds['val_images']} val images, {ds['classes']} classes, "
        f"{ds['background_images']} backgrounds",
        f"image long side: median {size['median_long_side']} px, max {size['max_long_side']} px{sampled}",
    ]
    errors = sum(p["severity"] == "error" for p in ds["problems"])
    if ds["problems"]:
        n = len(ds["problems"])
        lines.append(f"{_plural(n, 'problem')} ({_plural(errors, 'error')}); `speedtrain check` lists them")
    lines += ds.get("notes", [])
    return Panel("\n".join(lines), title="Dataset", title_align="left")


def render_plan(doc: dict[str, Any]) -> RenderableType:
    """The plan against the untuned baseline, knob by knob, with the reasons."""
    reasons, base = doc["reasons"], doc["baseline"]
    main = doc["stages"][0]
    table = Table(title=f"Plan: {doc['model']} on {doc['device']}", title_justify="left", expand=False)
    table.add_column("knob", style="bold")
    table.add_column("baseline")
    table.add_column("plan", style="green")
    table.add_column("why", overflow="fold", ratio=1)
    fallbacks = "->".join(map(str, main["batch_fallbacks"]))
    rows = [
        ("imgsz", base["imgsz"], main["imgsz"], reasons.get("imgsz")),
        (
            "batch",
            base["batch"],
            f"{main['batch']}" + (f" ->{fallbacks}" if fallbacks else ""),
            reasons.get("batch"),
        ),
        ("cache", base["cache"], main["cache"] or "none", reasons.get("cache")),
        ("workers", base["workers"], main["workers"], reasons.get("workers")),
        ("epochs", "100", main["epochs"], reasons.get("epochs")),
        ("optimizer", "auto", f"{main['optimizer']} lr0={main['lr0']}", reasons.get("optimizer")),
        ("cos_lr", "False", main["cos_lr"], reasons.get("lr0")),
        ("rect", "False", main["rect"], reasons.get("rect")),
        ("close_mosaic", "10", main["close_mosaic"], reasons.get("close_mosaic")),
        ("patience", "100", main["patience"], reasons.get("patience")),
        ("amp", "True", main["amp"], reasons.get("amp")),
        ("threads", "auto", main.get("threads") or "auto", reasons.get("threads")),
        ("deterministic", "True", main.get("deterministic", True), reasons.get("deterministic")),
        ("pipeline", "ultralytics", main.get("pipeline", "ultralytics"), reasons.get("pipeline")),
    ]
    for knob, b, p, why in rows:
        table.add_row(knob, str(b), str(p), why or "")
    for key, value in main.get("extra", {}).items():
        table.add_row(key, "", str(value), "set by user")
    parts: list[RenderableType] = [table]
    parts.append(Text(f"prepare: {reasons.get('prepare', 'off')}"))
    parts.append(Text(f"fine-tune: {reasons.get('finetune', 'off')}"))
    if len(doc["stages"]) > 1:
        ft = doc["stages"][1]
        parts.append(
            Text(
                f"  {ft['epochs']} epochs at {ft['imgsz']}, batch {ft['batch']}, "
                f"lr0 {ft['lr0']}, cache {ft['cache'] or 'none'}"
            )
        )
    if doc.get("estimates"):
        parts.append(Text("Estimated factors (not measured):", style="bold"))
        parts += [Text(f"  {k}: {v}") for k, v in doc["estimates"].items()]
    parts += [Text(f"warning: {w}", style="yellow") for w in doc.get("warnings", [])]
    return Group(*parts)


def render_report(doc: dict[str, Any], with_plan: bool = True) -> RenderableType:
    """The whole speed report: hardware, dataset, plan (unless it was just shown), and what each stage measured."""
    parts: list[RenderableType] = [render_hardware(doc["hardware"])]
    if with_plan:
        parts += [render_dataset(doc["dataset"]), render_plan(doc)]
    parts.append(render_measured(doc))
    run = doc.get("run", {})
    if run:
        parts.append(Text(run.get("model_note", "")))
        status = run.get("status") or ("interrupted" if run.get("interrupted") else "finished")
        if status == "running":  # the report of a run that was killed or crashed: it never finished
            line = f"Run stopped before it finished (killed or crashed): go on with --resume {run.get('run_dir')}"
        else:
            line = f"Run {status} in {_duration(run.get('wall_time_s', 0))}: {run.get('run_dir')}"
        parts.append(Text(line, style="bold"))
    return Group(*parts)


def render_resize(summary: dict[str, Any]) -> RenderableType:
    """The summary of one `speedtrain prepare` run."""
    table = Table(title=f"Resized to {summary['size']} px: {summary['out_dir']}", title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rate = summary.get("images_per_s")
    rows = [
        ("images", summary["images"]),
        ("resized", summary["resized"]),
        ("copied (already small)", summary["copied"]),
        ("unchanged since last run", summary["unchanged"]),
        ("failed (skipped)", len(summary["failed"])),
        ("labels copied", summary["labels_copied"]),
        ("removed (source gone)", summary["removed"]),
        ("MB before -> after", f"{summary['bytes_before'] / 1e6:.1f} -> {summary['bytes_after'] / 1e6:.1f}"),
        ("time", f"{summary['seconds']:.2f} s"),
        ("images/s", f"{rate:.1f} ({summary['workers']} processes)" if rate else "-"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return Group(table, *[Text(f"failed: {line}", style="yellow") for line in summary["failed"]])


def render_prepared(record: dict[str, Any]) -> RenderableType:
    """What pre-resizing cost and saved, in a training report."""
    s = record["summary"]
    lines = [
        record["decision"],
        f"{s['resized'] + s['copied']} images written in {s['seconds']:.1f} s "
        f"({s['unchanged']} unchanged since an earlier run), {s['bytes_before'] / 1e6:.1f} -> "
        f"{s['bytes_after'] / 1e6:.1f} MB",
    ]
    if record.get("load_ms_original") and record.get("load_ms_prepared"):
        lines.append(
            f"loading one image: {record['load_ms_original']:.1f} ms original vs {record['load_ms_prepared']:.1f} ms "
            f"prepared (measured on {record['load_sample']} images, one process): about "
            f"{record['saving_s_per_epoch']:.1f} s of loading saved per epoch"
        )
    failed = s.get("failed") or []
    lines += [f"skipped (unreadable: not in the copy, not trained on): {f}" for f in failed[:10]]
    if len(failed) > 10:
        lines.append(f"... and {len(failed) - 10} more skipped (the report's prepare.summary.failed lists all)")
    return Panel("\n".join(lines), title="Preparation", title_align="left")


def render_tune(t: dict[str, Any]) -> RenderableType:
    """What `speedtrain tune` measured, what it chose and why."""
    steps = Table(title="Model step (batches already on the device)", title_justify="left")
    for col in ("batch", "img/s", "+-", "peak GB"):
        steps.add_column(col, justify="right")
    for s in t["steps"]:
        rate = "out of memory" if s["oom"] else _num(s["images_per_s"], "{:.1f}")
        steps.add_row(str(s["batch"]), rate, _pct(s.get("rel_err")), _num(s["peak_mem_gb"], "{:.1f}"))
    loaders = Table(title="Training dataloader (augmentation included, no model)", title_justify="left")
    for col in ("workers", "cache", "img/s", "+-", "peak RAM GB"):
        loaders.add_column(col, justify="right")
    for x in t["loaders"]:
        loaders.add_row(
            str(x["workers"]),
            str(x["cache"] or "none"),
            f"{x['images_per_s']:.1f}",
            _pct(x.get("rel_err")),
            f"{x['peak_ram_gb']:.1f}",
        )
    achieved, plan_achieved = t.get("achieved_images_per_s"), t.get("plan_achieved_images_per_s")
    lines = [
        f"choice: batch {t['batch']}, {t['workers']} workers, cache {t['cache'] or 'none'}"
        + (" (the plan's)" if t.get("kept_plan") else "")
        + f": {t['predicted_images_per_s']} img/s predicted"
        + (f", {achieved} img/s achieved in a short real run" if achieved else ""),
        *(
            [f"the plan's configuration in the same run: {plan_achieved} img/s"]
            if plan_achieved is not None and not t.get("kept_plan")
            else []
        ),
        *t["diagnosis"],
        ("reused the measurement of " if t.get("cached") else "measured in ")
        + (t["created_at"] if t.get("cached") else f"{t['elapsed_s']} s of a {t['budget_s']:.0f} s budget"),
    ]
    return Group(steps, loaders, Panel("\n".join(lines), title="Tune", title_align="left"))


def render_problems(problems: list[dict[str, Any]], limit: int = 10) -> RenderableType:
    """Problems grouped by kind, with up to `limit` file names each."""
    if not problems:
        return Text("no problems found", style="green")
    kinds: dict[str, list[dict[str, Any]]] = {}
    for p in problems:
        kinds.setdefault(p["kind"], []).append(p)
    parts: list[RenderableType] = []
    for kind, items in kinds.items():
        style = "red" if items[0]["severity"] == "error" else "yellow"
        parts.append(Text(f"{kind}: {len(items)} ({items[0]['severity']})", style=f"bold {style}"))
        parts += [Text(f"  {p['file']}: {p['detail']}") for p in items[:limit]]
        if len(items) > limit:
            parts.append(Text(f"  ... and {len(items) - limit} more (--json lists all)"))
    return Group(*parts)


def problem_dicts(problems: Any) -> list[dict[str, Any]]:
    return [{"severity": p.severity, "kind": p.kind, "file": p.file, "detail": p.detail} for p in problems]


def render_measured(doc: dict[str, Any]) -> RenderableType:
    table = Table(title="Measured on this machine", title_justify="left", caption=MEASURED_CAPTION)
    for col in ("stage", "epochs", "batch", "epoch s", "img/s", "GPU %", "GPU GB", "mAP50-95"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    notes = []
    for stage in doc["stages"]:
        m = stage.get("measured")
        if not m:
            table.add_row(stage["name"], "-", "-", "-", "-", "-", "-", stage.get("status", "-"))
            if stage.get("note"):
                notes.append(f"{stage['name']}: {stage['note']}")
            continue
        times = m["epoch_times_s"]
        mean_epoch = f"{statistics.fmean(times):.1f}" if times else "-"
        score = m["best_metrics"].get("mAP50-95")
        table.add_row(
            stage["name"],
            f"{m['epochs_done']}/{stage['epochs']}",
            str(m["batch"]),
            mean_epoch,
            _num(m.get("images_per_s_steady") or m["images_per_s"], "{:.1f}"),
            _num(m["gpu_util_mean"], "{:.0f}"),
            _num(m["gpu_mem_peak_gb"], "{:.1f}"),
            _num(score, "{:.3f}"),
        )
        for oom in m.get("oom_fallbacks", []):
            notes.append(
                f"{stage['name']}: out of memory at batch {oom['from_batch']}, continued with {oom['to_batch']} "
                f"(epoch {oom['epoch']}, {oom['at']})"
            )
        if stage.get("status") == "interrupted" and stage.get("note"):
            notes.append(f"{stage['name']}: {stage['note']}")
        if m.get("threads") or m.get("cpu_util_mean") is not None:
            threads = f"{m['threads']} torch threads, " if m.get("threads") else ""
            notes.append(f"{stage['name']}: {threads}CPU busy {_num(m.get('cpu_util_mean'), '{:.0f}')} % (all cores)")
        if m.get("fast_store"):
            where = "read into RAM" if m["fast_store"] == "ram" else "memory-mapped from disk"
            notes.append(f"{stage['name']}: fast pipeline store {where}")
        if m.get("weights"):
            notes.append(f"{stage['name']} weights: {m['weights']}")
    return Group(table, *[Text(n) for n in notes])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pct(rel_err: float | None) -> str:
    """A relative standard error as a percentage; '-' where it was not measured."""
    return "-" if not rel_err else f"{rel_err:.0%}" if rel_err >= 0.01 else "<1%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


PNG_NAME = "speed_report.png"
PNG_SIZE_IN, PNG_DPI = (12.0, 4.5), 100  # 1200 x 450 pixels


def save_png(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the speed report's picture: per-epoch time and images/s per stage, and the plan against the baseline."""
    from matplotlib.figure import Figure  # matplotlib comes with Ultralytics; imported only when a PNG is made

    fig = Figure(figsize=PNG_SIZE_IN, dpi=PNG_DPI, layout="constrained")
    ax_time, ax_rate, ax_plan = fig.subplots(1, 3, width_ratios=[1, 1, 1.15])
    measured = [(s["name"], s["measured"]) for s in doc["stages"] if s.get("measured")]
    offset = 0  # stages share one epoch axis: the run as a timeline
    for name, m in measured:
        epochs = list(range(offset + 1, offset + len(m["epoch_times_s"]) + 1))
        ax_time.plot(epochs, m["epoch_times_s"], marker="o", label=f"{name}: whole epoch")
        train = m.get("train_times_s") or []
        if train:  # after a kill and --resume, the epochs before it have whole-epoch times only: align to the end
            timed = epochs[len(epochs) - len(train) :]
            ax_time.plot(timed, train, marker=".", linestyle="--", label=f"{name}: training pass")
            rates = [m["images_per_epoch"] / t if t > 0 else 0 for t in train]
            ax_rate.plot(timed, rates, marker="o", label=name)
        if offset:
            for ax in (ax_time, ax_rate):
                ax.axvline(offset + 0.5, color="grey", linewidth=0.8)
        offset = epochs[-1] if epochs else offset
    _style(ax_time, "Seconds per epoch", "epoch of the run", "s", offset)
    _style(ax_rate, "Training images per second", "epoch of the run", "images/s", offset)
    if not measured:
        ax_time.text(0.5, 0.5, "no stage ran", ha="center", transform=ax_time.transAxes)
    _plan_table(ax_plan, doc)
    hw = doc.get("hardware", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus", [])) or "CPU only"
    fig.suptitle(f"speedtrain: {doc.get('model', '')} on {gpus}", fontsize=11)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=PNG_DPI)
    tmp.replace(path)
    return path


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


def _plan_table(ax: Any, doc: dict[str, Any]) -> None:
    """Baseline vs plan, knob by knob; estimates are labelled as such."""
    base, main = doc["baseline"], doc["stages"][0]
    m = main.get("measured") or {}
    rows = [
        ["image size", base["imgsz"], main["imgsz"]],
        ["batch", base["batch"], m.get("batch", main["batch"])],
        ["cache", base["cache"], main["cache"] or "none"],
        ["workers", base["workers"], main["workers"]],
        ["rect / cos_lr", "False / False", f"{main['rect']} / {main['cos_lr']}"],
        ["optimizer", "auto", main["optimizer"]],
    ]
    if m.get("images_per_s"):
        rows.append(["measured img/s", "not run", f"{m.get('images_per_s_steady') or m['images_per_s']:.1f}"])
    ax.axis("off")
    table = ax.table(
        cellText=[[str(c) for c in r] for r in rows], colLabels=["knob", "baseline", "plan"], loc="upper center"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title("Plan vs untuned baseline", fontsize=10)
    notes = [textwrap.fill(f"{k}: {v}", 62) for k, v in doc.get("estimates", {}).items()]
    ax.text(0, 0.0, "\n".join(notes), fontsize=7, transform=ax.transAxes, va="bottom")
