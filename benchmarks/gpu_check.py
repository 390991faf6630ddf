#!/usr/bin/env python3
"""The steps of `benchmarks/gpu_check.sh`: each writes one JSON record, `report` turns them into the tables.

    python benchmarks/gpu_check.py facts      --out OUT
    python benchmarks/gpu_check.py probe      --out OUT
    python benchmarks/gpu_check.py dataset    --out OUT --work W --mode gpu|cpu [--images 2048] [--source DIR]
    python benchmarks/gpu_check.py floor      --out OUT --work W
    python benchmarks/gpu_check.py plain      --out OUT --work W --row defaults|plan-settings
    python benchmarks/gpu_check.py speedtrain --out OUT --work W --row plan|fast|autotune|deterministic
    python benchmarks/gpu_check.py oom        --out OUT --work W
    python benchmarks/gpu_check.py ctrlc      --out OUT --work W
    python benchmarks/gpu_check.py compare    --out OUT --work W
    python benchmarks/gpu_check.py report     --out OUT

Every step after `dataset` reads the mode (gpu or cpu) and the sizes from OUT/settings.json, so the shell script
runs each step in its own process under its own time limit: a step that fails or times out leaves no record, and
the report names it with the last line of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "speedtrain" / "sample"
MODEL = "yolo26n.yaml"  # built from scratch: pretrained weights cannot be fetched on the test machines

# Sizes per mode: the GPU mode measures steady state on a few thousand images; the CPU mode is a smoke run that
# proves the script works (CI), not a speed comparison.
MODES = {
    "gpu": {
        "images": 2048,
        "val": 64,
        "imgsz": 416,
        "epochs": 3,
        "defaults_imgsz": 640,
        "tune_budget_s": 45,
        "compare_budget_s": 30,
    },
    "cpu": {
        "images": 16,
        "val": 4,
        "imgsz": 64,
        "epochs": 2,
        "defaults_imgsz": 64,
        "tune_budget_s": 12,
        "compare_budget_s": 10,
    },
}
THROUGHPUT_ROWS = ("defaults", "plan-settings", "plan", "fast", "autotune", "deterministic", "torchrun", "floor")
ROW_TITLES = {
    "defaults": "Ultralytics defaults (640, batch 16, 8 workers, no cache)",
    "plan-settings": "Ultralytics with the plan's settings",
    "plan": "speedtrain train (its plan)",
    "fast": "speedtrain train --pipeline fast",
    "autotune": "speedtrain train --autotune",
    "deterministic": "speedtrain train --deterministic",
    "torchrun": "speedtrain train under torchrun --nproc-per-node 1 (the launcher path; should match plan)",
    "floor": "step floor (fwd + bwd + step, batches on the device)",
}
CHECKS = ("facts", "probe", "dataset", *THROUGHPUT_ROWS, "oom", "ctrlc", "compare")
COMPARE_ARMS = "defaults,plan,plan-phases"


def settings(out: Path) -> dict[str, Any]:
    return json.loads((out / "settings.json").read_text())


def record(out: Path, name: str, data: dict[str, Any]) -> None:
    """Write one step's record atomically: a step killed mid-write leaves none."""
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    tmp = steps / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, steps / f"{name}.json")


# ------------------------------------------------------------------------------------------------ facts and probe


def step_facts(out: Path, _work: Path, _args: argparse.Namespace) -> None:
    import psutil
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "shm_gb": round(shutil.disk_usage("/dev/shm").total / 1024**3, 2) if Path("/dev/shm").exists() else None,
    }
    with contextlib.suppress(ImportError):
        import ultralytics

        facts["ultralytics"] = ultralytics.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1024**3, 1)}
        facts |= _smi("driver_version,mig.mode.current")
    record(out, "facts", facts)


def _smi(fields: str) -> dict[str, str]:
    """nvidia-smi's answer for GPU 0 (empty where there is no nvidia-smi)."""
    try:
        text = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in text.strip().split(",")), strict=False))


def step_probe(out: Path, _work: Path, _args: argparse.Namespace) -> None:
    """speedtrain's probe against nvidia-smi: the same GPU, free memory within 2%."""
    from speedtrain import hardware

    snap = hardware.probe()
    smi = _smi("name,memory.total,memory.free")
    data: dict[str, Any] = {"probe": hardware.to_dict(snap), "nvidia_smi": smi}
    if snap.gpus and smi:
        smi_free = float(smi["memory.free"]) / 1024  # MiB -> GiB
        ours = snap.gpus[0].free_vram_gb
        data |= {
            "same_gpu": snap.gpus[0].name == smi["name"],
            "free_gb_probe": ours,
            "free_gb_smi": round(smi_free, 2),
            "free_diff_pct": round(abs(ours - smi_free) / smi_free * 100, 2) if smi_free else None,
        }
        data["ok"] = data["same_gpu"] and (data["free_diff_pct"] or 0) <= 2.0
    else:
        data["ok"] = not snap.gpus and not smi  # no GPU: both agree there is none
    record(out, "probe", data)


# -------------------------------------------------------------------------------------------------------- dataset


def step_dataset(out: Path, work: Path, args: argparse.Namespace) -> None:
    """Real photos (the embedded sample, or --source), repeated under new names to the mode's image count."""
    mode = MODES[args.mode]
    n = args.images or mode["images"]
    source = Path(args.source) if args.source else SAMPLE
    pairs = _photos(source)
    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    for split, count, offset in (("train", n, 0), ("val", mode["val"], n)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image, label = pairs[(i + offset) % len(pairs)]
            name = f"{i:05d}_{image.stem}"
            _link_or_copy(image, root / "images" / split / f"{name}{image.suffix}")
            if label.is_file():
                shutil.copy2(label, root / "labels" / split / f"{name}.txt")
    names = yaml.safe_load((SAMPLE / "data.yaml").read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    data = {
        **mode,
        "mode": args.mode,
        "images": n,
        "dataset": str(root),
        "source": f"{len(pairs)} real photos of {source.name}, repeated to {n} train + {mode['val']} val",
    }
    (out / "settings.json").write_text(json.dumps(data, indent=2) + "\n")
    record(out, "dataset", data)


def _photos(source: Path) -> list[tuple[Path, Path]]:
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file())
    if not images:
        raise SystemExit(f"no images under {source}")
    sep = os.sep
    return [(p, Path(str(p).replace(f"{sep}images{sep}", f"{sep}labels{sep}")).with_suffix(".txt")) for p in images]


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows it (2,000 files cost no space), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# ----------------------------------------------------------------------------------------------------- throughput


def _plan_stage(out: Path, **overrides: Any) -> Any:
    """The main stage of speedtrain's plan for this machine and the check's dataset."""
    from speedtrain import planner, workflow

    s = settings(out)
    ov = planner.Overrides(imgsz=s["imgsz"], epochs=s["epochs"], finetune="no", prepare="no", model=MODEL, **overrides)
    return workflow.make_plan(s["dataset"], ov).plan.stages[0]


def step_floor(out: Path, _work: Path, _args: argparse.Namespace) -> None:
    """forward + loss + backward + Adam step on batches already on the device, at the plan's batch (AMP on a GPU)."""
    from speedtrain import tuner

    stage = _plan_stage(out)
    on_gpu = stage.on_gpu
    steps = tuner.probe_steps(stage, MODEL, on_gpu, time.perf_counter() + 60, log=lambda _: None)
    mine = next(p for p in steps if p.batch == tuner._plan_batch(stage))
    record(
        out,
        "floor",
        {
            "row": "floor",
            "batch": mine.batch,
            "imgsz": stage.imgsz,
            "images_per_s": mine.images_per_s,
            "rel_err": mine.rel_err,
            "peak_vram_gb": mine.peak_mem_gb,
            "oom": mine.oom,
            "all_batches": [{"batch": p.batch, "images_per_s": p.images_per_s, "oom": p.oom} for p in steps],
        },
    )


def step_plain(out: Path, work: Path, args: argparse.Namespace) -> None:
    """Plain Ultralytics (no speedtrain code in the training loop), timed by two callbacks."""
    s = settings(out)
    if args.row == "defaults":
        train_args: dict[str, Any] = {"imgsz": s["defaults_imgsz"], "batch": 16, "workers": 8, "cache": False}
    else:  # the plan's settings, handed to Ultralytics as they are
        train_args = _plan_stage(out).train_args()
    gpu = (0,) if s["mode"] == "gpu" else ()
    train_args |= {"epochs": s["epochs"], "device": "0" if gpu else "cpu", "plots": False, "patience": 100}
    rec = _timed_ultralytics(train_args, s["dataset"], work / "runs" / args.row, gpu)
    record(out, args.row, {"row": args.row, "train_args": {k: str(v) for k, v in train_args.items()}, **rec})


def _timed_ultralytics(train_args: dict[str, Any], data: str, project: Path, gpu: tuple[int, ...]) -> dict[str, Any]:
    from ultralytics import YOLO

    from speedtrain.monitor import Monitor

    starts: dict[int, float] = {}
    times: dict[int, float] = {}
    images: list[int] = []

    def start(trainer: Any) -> None:
        starts[trainer.epoch] = time.perf_counter()

    def end(trainer: Any) -> None:
        times[trainer.epoch] = time.perf_counter() - starts[trainer.epoch]
        images.append(len(trainer.train_loader.dataset))

    model = YOLO(MODEL)
    model.add_callback("on_train_epoch_start", start)
    model.add_callback("on_train_epoch_end", end)
    t0 = time.perf_counter()
    _reset_peak()
    with Monitor(gpu) as monitor:
        model.train(data=data, project=str(project.parent), name=project.name, exist_ok=True, **train_args)
    steady = [times[e] for e in sorted(times)][1:]
    summary = monitor.summary()
    return {
        "images_per_s": round(images[-1] * len(steady) / sum(steady), 1) if steady else None,
        "gpu_util": summary.gpu_util_mean,
        "cpu_util": summary.cpu_util_mean,
        "peak_vram_gb": _peak() or summary.gpu_mem_peak_gb,
        "epoch_train_s": [round(times[e], 2) for e in sorted(times)],
        "wall_s": round(time.perf_counter() - t0, 1),
        "batch": train_args["batch"],
        "imgsz": train_args["imgsz"],
    }


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float | None:
    import torch

    return round(torch.cuda.max_memory_reserved() / 1024**3, 2) if torch.cuda.is_available() else None


SPEEDTRAIN_FLAGS = {
    "plan": [],
    "fast": ["--pipeline", "fast"],
    "autotune": ["--autotune", "--retune"],
    "deterministic": ["--deterministic"],
    "torchrun": [],
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


def _train_cmd(s: dict[str, Any], project: Path, epochs: int, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        "--dataset",
        s["dataset"],
        "--model",
        MODEL,
        "--epochs",
        str(epochs),
        "--img-size",
        str(s["imgsz"]),
        "--finetune",
        "no",
        "--prepare",
        "no",
        "--project",
        str(project),
        *flags,
        "plots=False",
        "patience=100",
    ]


def step_speedtrain(out: Path, work: Path, args: argparse.Namespace) -> None:
    """`speedtrain train` as a user runs it (the CLI in a subprocess); the figures from its speed_report.json."""
    s = settings(out)
    project = work / "runs" / f"speedtrain-{args.row}"
    flags = list(SPEEDTRAIN_FLAGS[args.row])
    if args.row == "autotune":
        flags += ["--budget-s", str(s["tune_budget_s"])]
    cmd = _train_cmd(s, project, s["epochs"], *flags)
    if args.row == "torchrun":  # the same command as one rank of PyTorch's launcher, as a cluster job starts it
        cmd = [sys.executable, *TORCHRUN, *cmd[1:]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stdout.write(done.stdout[-20000:])
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode != 0:
        raise SystemExit(f"speedtrain train exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    main = doc["stages"][0]
    m = main["measured"]
    tuned = doc.get("tune") or {}
    record(
        out,
        args.row,
        {
            "row": args.row,
            "images_per_s": m.get("images_per_s_steady") or m.get("images_per_s"),
            "gpu_util": m.get("gpu_util_mean"),
            "cpu_util": m.get("cpu_util_mean"),
            "peak_vram_gb": m.get("gpu_mem_peak_gb"),
            "epoch_train_s": m.get("train_times_s"),
            "wall_s": round(wall, 1),
            "batch": m.get("batch"),
            "imgsz": main["imgsz"],
            "workers": main["workers"],
            "cache": main["cache"],
            "pipeline": main.get("pipeline"),
            "deterministic": main.get("deterministic"),
            "threads": m.get("threads"),
            "oom_fallbacks": m.get("oom_fallbacks"),
            "tune_s": tuned.get("elapsed_s"),
            "tune_kept_plan": tuned.get("kept_plan"),
            "tune_achieved": tuned.get("achieved_images_per_s"),
            "tune_plan_achieved": tuned.get("plan_achieved_images_per_s"),
            "map50_95": m.get("best_metrics", {}).get("mAP50-95"),
        },
    )


# ------------------------------------------------------------------------------------------------------------ OOM


def step_oom(out: Path, work: Path, _args: argparse.Namespace) -> None:
    """A real CUDA OOM: cap this process's GPU memory to emulate a small card, start from a batch that cannot fit,
    and check that the chain is walked, memory is freed between attempts and the stage completes."""
    import torch

    from speedtrain import runner
    from speedtrain.records import Hooks

    if not torch.cuda.is_available():
        record(out, "oom", {"skipped": "needs CUDA (set_per_process_memory_fraction caps GPU memory only)"})
        return
    s = settings(out)
    # A 6 GB card: yolo26n at 640 with AMP fits a batch of a few dozen there, never 256 (the planner's estimate
    # is 0.21 GB per image at 640, 54 GB for 256); each failed attempt costs a trainer and its workers' start.
    cap_gb = 6.0
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    torch.cuda.set_per_process_memory_fraction(cap_gb / total, 0)
    stage = replace(
        _plan_stage(out),
        imgsz=640,
        batch=256,
        batch_fallbacks=(128, 64, 32, 16, 8, 4),
        epochs=1,
        cache=False,
        workers=4,
        extra=(("plots", False), ("fraction", min(1.0, 512 / s["images"]))),
    )
    at_start: list[float] = []
    original = runner._train_once

    def traced(*a: Any, **kw: Any) -> Any:
        at_start.append(round(torch.cuda.memory_allocated(0) / 1024**3, 3))  # what earlier attempts left behind
        return original(*a, **kw)

    runner._train_once = traced
    result = runner.train_stage(
        stage, MODEL, runner.StageContext(_view(out, work), work / "runs" / "oom", Hooks(log=print))
    )
    record(
        out,
        "oom",
        {
            "cap_gb": cap_gb,
            "tried": [f.from_batch for f in result.oom_fallbacks] + [result.batch],
            "fallbacks": [
                {"epoch": f.epoch, "from": f.from_batch, "to": f.to_batch, "error": f.error[:120]}
                for f in result.oom_fallbacks
            ],
            "allocated_gb_at_each_attempt": at_start,
            "status": result.status,
            "epochs_done": result.epochs_done,
            "peak_vram_gb": result.gpu_mem_peak_gb,
            "ok": result.status == "completed" and len(result.oom_fallbacks) >= 1 and max(at_start[1:] or [0]) < 0.5,
        },
    )


def _view(out: Path, work: Path) -> str:
    """The dataset's linked view (Ultralytics writes its label caches there, not into the data)."""
    from speedtrain import resize, workflow

    stats = workflow.scan_dataset(settings(out)["dataset"])
    return str(resize.make_view(stats, resize.view_dir(stats, work / "runs")))


# --------------------------------------------------------------------------------------------------------- Ctrl-C


def step_ctrlc(out: Path, work: Path, _args: argparse.Namespace) -> None:
    """SIGINT to the training's whole process group in epoch 2 (dataloader workers included), then --resume."""
    s = settings(out)
    project = work / "runs" / "ctrlc"
    epochs = 4
    proc = subprocess.Popen(
        _train_cmd(s, project, epochs),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    csv_path = project / "train" / "main" / "results.csv"
    if not _wait(lambda: len(_csv_epochs(csv_path)) >= 1 or proc.poll() is not None, timeout=240):
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit("epoch 1 never finished")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole group, workers too
    first_out, _ = proc.communicate(timeout=240)
    after_ctrlc = _csv_epochs(csv_path)
    resumed = subprocess.run(
        [sys.executable, "-m", "speedtrain", "train", "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=400,
    )
    epochs_seen = _csv_epochs(csv_path)
    record(
        out,
        "ctrlc",
        {
            "first_exit": proc.returncode,
            "epochs_after_ctrlc": after_ctrlc,
            "resume_exit": resumed.returncode,
            "epochs_after_resume": epochs_seen,
            "tail": first_out.strip().splitlines()[-3:],
            "resume_tail": (resumed.stdout + resumed.stderr).strip().splitlines()[-3:],
            "ok": proc.returncode == 130 and resumed.returncode == 0 and epochs_seen == list(range(1, epochs + 1)),
        },
    )


def _csv_epochs(path: Path) -> list[int]:
    try:
        with path.open(newline="") as f:
            return [int(float(row["epoch"])) for row in csv.DictReader(f, skipinitialspace=True)]
    except (OSError, KeyError, ValueError):
        return []


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# -------------------------------------------------------------------------------------------------------- compare


def step_compare(out: Path, work: Path, _args: argparse.Namespace) -> None:
    """`speedtrain compare` as a user runs it: the arms for the same budget each, then time to accuracy."""
    s = settings(out)
    project = work / "runs" / "compare"
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "compare",
        "--dataset",
        s["dataset"],
        "--model",
        MODEL,
        "--budget",
        f"{s['compare_budget_s']}s",
        "--baseline-budget",
        f"{s['compare_budget_s']}s",
        "--arms",
        COMPARE_ARMS,
        "--img-size",
        str(s["imgsz"]),
        "--baseline-img-size",
        str(s["defaults_imgsz"]),
        "--finetune-img-size",
        str(s["defaults_imgsz"]),
        "--prepare",
        "no",
        "--project",
        str(project),
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode != 0:
        raise SystemExit(f"speedtrain compare exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(done.stdout)
    record(
        out,
        "compare",
        {
            "budget_s": doc["budget_s"],
            "val_imgsz": doc["val_imgsz"],
            "val_sizes": doc["val_sizes"],
            "arms": [
                {
                    k: a.get(k)
                    for k in (
                        "name",
                        "imgsz",
                        "phases",
                        "batch",
                        "epochs_done",
                        "images_per_s",
                        "wall_s",
                        "eval_s",
                        "final",
                        "latency_ms",
                        "note",
                    )
                }
                for a in doc["arms"]
            ],
            "time_to_accuracy": doc["time_to_accuracy"],
        },
    )


def _compare_rows(rec: dict[str, Any] | None, failed: dict[str, str]) -> list[str]:
    if not rec:
        return ["", f"Time to accuracy (`speedtrain compare`): failed: {failed.get('compare')}"]
    sizes = rec["val_sizes"]
    lines = [
        "",
        f"Time to accuracy (`speedtrain compare --arms {COMPARE_ARMS}`, {rec['budget_s']:.0f} s per arm, every "
        f"saved epoch validated at {rec['val_imgsz']} px afterwards):",
        "",
        "| arm | imgsz / batch | epochs | images/s | "
        + " | ".join(f"mAP50-95 @{s}" for s in sizes)
        + " | ms @640 | wall s |",
        "|---|---|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for a in rec["arms"]:
        finals = {f["imgsz"]: f["mAP50-95"] for f in a["final"]}
        lines.append(
            f"| {a['name']} | {'-'.join(map(str, a.get('phases') or [a['imgsz']]))} / {a['batch']} | "
            f"{a['epochs_done']} | {_f(a['images_per_s'])} | "
            + " | ".join(_f(finals.get(s), 3) for s in sizes)
            + f" | {_f(a['latency_ms'].get('640'))} | {a['wall_s']:.0f} |"
        )
    lines += [""] + [f"- {t['line']}" for t in rec["time_to_accuracy"]]
    return lines


# --------------------------------------------------------------------------------------------------------- report


def step_report(out: Path, _work: Path, _args: argparse.Namespace) -> None:
    """gpu_check.md (the tables a person reads) and gpu_check.json (every record) from the steps' records."""
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.json"))}
    failed = {name: _last_log_line(out, name) for name in CHECKS if name not in recs}
    (out / "gpu_check.json").write_text(json.dumps({"records": recs, "failed": failed}, indent=2) + "\n")
    text = "\n".join(markdown(recs, failed)) + "\n"
    (out / "gpu_check.md").write_text(text)
    print(text)


def _last_log_line(out: Path, name: str) -> str:
    log = out / "logs" / f"{name}.log"
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "did not run"
    return (lines[-1][:200] if lines else "no output").replace("|", "/") + f" (logs/{name}.log)"


def markdown(recs: dict[str, Any], failed: dict[str, str]) -> list[str]:
    facts, s = recs.get("facts", {}), recs.get("dataset", {})
    gpu = facts.get("gpu", "no GPU")
    lines = [
        f"# GPU acceptance: {gpu}",
        "",
        f"{gpu}, {facts.get('gpu_memory_gb', '-')} GB; MIG {facts.get('mig.mode.current', '-')}; driver "
        f"{facts.get('driver_version', '-')}, CUDA {facts.get('cuda', '-')}, torch {facts.get('torch', '-')}, "
        f"Ultralytics {facts.get('ultralytics', '-')}, Python {facts.get('python', '-')}; "
        f"{facts.get('cores_logical', '-')} cores, {facts.get('ram_gb', '-')} GB RAM, /dev/shm "
        f"{facts.get('shm_gb', '-')} GB. Mode: {s.get('mode', '-')}. Data: {s.get('source', '-')}; model {MODEL} "
        f"from scratch; {s.get('epochs', '-')} epochs per training row, the first left out (steady state).",
        "",
    ]
    probe = recs.get("probe")
    if probe and "free_gb_probe" in probe:
        lines += [
            f"probe vs nvidia-smi: {'OK' if probe.get('ok') else 'MISMATCH'}: free {probe['free_gb_probe']} GB "
            f"(speedtrain) vs {probe['free_gb_smi']} GB (nvidia-smi), {probe['free_diff_pct']} % apart",
            "",
        ]
    elif probe:
        lines += [f"probe vs nvidia-smi: {'OK: no GPU on either' if probe.get('ok') else 'MISMATCH'}", ""]
    else:
        lines += [f"probe vs nvidia-smi: failed: {failed.get('probe')}", ""]
    lines += _throughput(recs, failed)
    lines += ["", "| check | result | detail |", "|---|---|---|", _oom_row(recs.get("oom"), failed)]
    lines.append(_ctrlc_row(recs.get("ctrlc"), failed))
    lines += _compare_rows(recs.get("compare"), failed)
    return lines


def _throughput(recs: dict[str, Any], failed: dict[str, str]) -> list[str]:
    floor = (recs.get("floor") or {}).get("images_per_s")
    defaults = (recs.get("defaults") or {}).get("images_per_s")
    lines = [
        "| row | imgsz / batch | images/s | GPU busy % | CPU % | peak VRAM GB | x floor | x defaults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in THROUGHPUT_ROWS:
        r = recs.get(row)
        if r is None:
            lines.append(f"| {ROW_TITLES[row]} | failed: {failed.get(row, '?')} | | | | | | |")
            continue
        rate = r.get("images_per_s")
        lines.append(
            f"| {ROW_TITLES[row]} | {r.get('imgsz', '-')} / {r.get('batch', '-')} | {_f(rate)} | "
            f"{_f(r.get('gpu_util'), 0)} | {_f(r.get('cpu_util'), 0)} | {_f(r.get('peak_vram_gb'))} | "
            f"{_ratio(rate, floor)} | {_ratio(rate, defaults)} |"
        )
    auto = recs.get("autotune")
    if auto and auto.get("tune_s") is not None:
        lines += [
            "",
            f"autotune: {auto['tune_s']} s of probes; kept the plan: {auto.get('tune_kept_plan')}; confirming runs: "
            f"tuned {auto.get('tune_achieved')}, plan {auto.get('tune_plan_achieved')} img/s",
        ]
    return lines


def _oom_row(oom: dict[str, Any] | None, failed: dict[str, str]) -> str:
    if oom is None:
        return f"| OOM on an emulated small card | failed | {failed.get('oom')} |"
    if oom.get("skipped"):
        return f"| OOM on an emulated small card | skipped | {oom['skipped']} |"
    return (
        f"| OOM on an emulated {oom['cap_gb']:g} GB card | {'OK' if oom['ok'] else 'FAILED'} | batches tried "
        f"{' -> '.join(map(str, oom['tried']))}; GB still allocated at each attempt "
        f"{oom['allocated_gb_at_each_attempt']}; {oom['status']} |"
    )


def _ctrlc_row(ctrlc: dict[str, Any] | None, failed: dict[str, str]) -> str:
    if ctrlc is None:
        return f"| Ctrl-C mid-epoch, then --resume | failed | {failed.get('ctrlc')} |"
    return (
        f"| Ctrl-C mid-epoch, then --resume | {'OK' if ctrlc['ok'] else 'FAILED'} | exit {ctrlc['first_exit']} with "
        f"epochs {ctrlc['epochs_after_ctrlc']} saved; resume exit {ctrlc['resume_exit']}, results.csv epochs "
        f"{ctrlc['epochs_after_resume']} |"
    )


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


STEPS: dict[str, Callable[[Path, Path, argparse.Namespace], None]] = {
    "facts": step_facts,
    "probe": step_probe,
    "dataset": step_dataset,
    "floor": step_floor,
    "plain": step_plain,
    "speedtrain": step_speedtrain,
    "oom": step_oom,
    "ctrlc": step_ctrlc,
    "compare": step_compare,
    "report": step_report,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--mode", choices=sorted(MODES), default="gpu")
    ap.add_argument("--row", default="")
    ap.add_argument("--images", type=int, default=0)
    ap.add_argument("--source", default="")
    args = ap.parse_args()
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    STEPS[args.step](args.out, work, args)


if __name__ == "__main__":
    main()
