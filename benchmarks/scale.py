#!/usr/bin/env python3
"""Datasets of thousands of images: the time to the first training batch, phase by phase, against plain Ultralytics.

    python benchmarks/scale.py --source ../shared/datasets/ppe-large --sizes 1000,5000,25000 --model yolov8n.pt

For each size, builds a dataset of that many training images from the source's real photos (each repeated under
distinct names as hard links, or copies across file systems; the source's val split as is) in --work, then runs,
each in a fresh process: speedtrain's first run in a new project folder (the one-off pre-resize included), its
second run there (what every later run pays), both as planned (the fine-tune off), and plain Ultralytics
(`model.train(data=...)`, its defaults). Every run stops at its first training batch, timed from the call (the
imports before it). Printed per run: the seconds at which each phase ended (scan
and plan, the pre-resize, the linked view, Ultralytics' setup with its label scan and image cache), the longest
stretch with nothing printed, the process's peak resident memory, and the time to the first batch against plain
Ultralytics'. A markdown table; --out writes it to a file too. --tiny: 40 images, a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "ppe-large"
RESULT = "scale-result: "  # the line a run's process prints before it stops


def build(source: Path, n: int, root: Path) -> Path:
    """`n` training images from the source's train photos under distinct names, its val split, and a data.yaml."""
    import yaml

    from speedtrain import dataset

    stats = dataset.scan(source)
    photos = stats.split("train").image_files
    labels = stats.split("train").label_files
    if root.is_dir() and sum(1 for _ in (root / "images" / "train").iterdir()) == n:
        return root / "data.yaml"  # built by an earlier call
    shutil.rmtree(root, ignore_errors=True)
    for d in ("images/train", "labels/train", "images/val", "labels/val"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        image, label = Path(photos[i % len(photos)]), Path(labels[i % len(photos)])
        name = f"r{i // len(photos):03d}_{image.stem}"
        _place(image, root / "images" / "train" / f"{name}{image.suffix}")
        if label.is_file():
            _place(label, root / "labels" / "train" / f"{name}.txt")
    val = stats.split("val")
    for image, label in zip(val.image_files, val.label_files, strict=True):
        _place(Path(image), root / "images" / "val" / Path(image).name)
        if Path(label).is_file():
            _place(Path(label), root / "labels" / "val" / Path(label).name)
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(stats.names))}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class Clock:
    """Seconds since the run's call; marks and the longest stretch without output."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.silence = (0.0, "")

    def heard(self, what: str) -> None:
        now = time.perf_counter()
        if now - self.last > self.silence[0]:
            self.silence = (now - self.last, what[:60])
        self.last = now

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, round(time.perf_counter() - self.t0, 1))

    def stop(self, extra: dict | None = None) -> None:
        self.mark("first batch")
        silence, before = round(self.silence[0], 1), self.silence[1]
        doc = {"marks": self.marks, "silence_s": silence, "silence_before": before, "peak_gb": round(_peak_gb(), 2)}
        # on the real stdout: speedtrain sends sys.stdout to its log file while a stage trains
        print("\n" + RESULT + json.dumps(doc | (extra or {})), file=sys.__stdout__, flush=True)
        os._exit(0)  # the first batch is all this measures: no epoch, no report


def run_speedtrain(data: str, project: str, model: str, cache: str | None = None) -> None:
    import contextlib

    import speedtrain
    from speedtrain import ultra

    clock = Clock()
    callbacks = ultra.Recorder.callbacks

    def marked(self: ultra.Recorder) -> dict:  # Ultralytics' setup ends: its datasets (and image cache) are built
        events = callbacks(self)
        events.setdefault("on_pretrain_routine_end", []).append(lambda trainer: clock.mark("setup"))
        return events

    ultra.Recorder.callbacks = marked  # type: ignore[method-assign]

    def log(line: str) -> None:
        clock.heard(line)
        if line.startswith("run folder:"):
            clock.mark("view")
        print(line, file=sys.__stderr__, flush=True)

    @contextlib.contextmanager
    def progress(label: str):
        clock.mark("scan and plan")
        clock.heard(label)
        yield lambda done, total: clock.heard(label)
        clock.mark("prepare")

    def on_event(kind: str, value: object) -> None:
        clock.heard(kind)
        if kind == "prepared":
            clock.mark("scan and plan")
            clock.mark("prepare")

    def on_update(progress: object) -> None:
        clock.stop()

    hooks = speedtrain.Hooks(log=log, on_update=on_update, on_event=on_event, progress=progress)
    knobs = {"cache": cache} if cache else {}
    speedtrain.train(data, project=project, model=model, finetune="no", verbose=False, hooks=hooks, **knobs)


def run_ultralytics(data: str, project: str, model: str) -> None:
    from ultralytics import YOLO

    clock = Clock()
    yolo = YOLO(model)
    yolo.add_callback("on_pretrain_routine_end", lambda trainer: clock.mark("setup"))
    yolo.add_callback("on_train_batch_end", lambda trainer: clock.stop())
    yolo.train(data=data, project=project, name="train", plots=False, exist_ok=True)  # its defaults


def measure(kind: str, data: Path, project: Path, model: str, work: Path, cache: str | None = None) -> dict:
    """One run in a fresh process; its result line."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(work / "yolo-config")}
    cmd = [
        sys.executable,
        __file__,
        "--run",
        kind,
        str(data),
        str(project),
        model,
        *(["--cache", cache] if cache else []),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    lines = [ln.split(RESULT, 1)[1] for ln in done.stdout.splitlines() if RESULT in ln]
    if not lines:
        raise SystemExit(f"{kind} on {data}: no result (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1]) | {"wall_s": round(time.perf_counter() - t0, 1)}


PHASES = ("scan and plan", "prepare", "view", "setup", "first batch")


def table(rows: list[tuple[int, str, dict]]) -> str:
    head = "| images | run | " + " | ".join(f"{p} (s)" for p in PHASES) + " | vs plain | longest silence | peak RSS |"
    out = [head, "|" + "---|" * (len(PHASES) + 5)]
    plain = {n: r["marks"]["first batch"] for n, kind, r in rows if kind == "plain Ultralytics"}
    for n, kind, r in rows:
        marks = r["marks"]
        cells = [str(marks.get(p, "-")) for p in PHASES]
        ratio = marks["first batch"] / plain[n] if plain.get(n) else None
        vs = f"{ratio:.2f}x" if ratio else "-"
        silence = "-" if kind == "plain Ultralytics" else f"{r['silence_s']} s"  # it prints to the console itself
        out.append(f"| {n:,} | {kind} | " + " | ".join(cells) + f" | {vs} | {silence} | {r['peak_gb']} GB |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--sizes", default="1000,5000,25000")
    ap.add_argument("--model", default="yolov8n.pt")
    ap.add_argument("--work", type=Path, help="where the datasets and runs go (default: a temporary folder)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cache", choices=("ram", "disk", "none"), help="speedtrain's runs: this cache, not the plan's")
    ap.add_argument("--no-plain", action="store_true", help="leave plain Ultralytics out (measured already)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: 40 images from the embedded sample's photos")
    ap.add_argument("--run", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        kind, data, project, model = args.run
        if kind.startswith("speedtrain"):
            run_speedtrain(data, project, model, args.cache)
        else:
            run_ultralytics(data, project, model)
        raise SystemExit(f"{kind}: training ended before its first batch was heard")
    sizes = [40] if args.tiny else [int(s) for s in args.sizes.split(",")]
    source = REPO / "speedtrain" / "sample" if args.tiny else args.source
    model = "yolo26n.yaml" if args.tiny and args.model == "yolov8n.pt" else str(Path(args.model).absolute())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in sizes:
            data = build(source, n, work / f"ds-{n}")
            project = work / f"runs-{n}"
            shutil.rmtree(project, ignore_errors=True)
            kinds = ["speedtrain, first run", "speedtrain, second run"] + (
                [] if args.no_plain else ["plain Ultralytics"]
            )
            for kind in kinds:
                rows.append((n, kind, measure(kind, data, project, model, work, args.cache)))
                print(f"{n} images, {kind}: {rows[-1][2]}", file=sys.stderr, flush=True)
    machine = f"{platform.node() or 'this machine'} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}"
    text = f"Time to the first training batch, {machine}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
