"""What a user's files and machine can hold where a file is expected: links, FIFOs, devices, absurd class counts,
yaml tags. Each is one line and an exit code, in bounded time and memory, with the dataset unchanged. Run as the
user runs it: the CLI in a child process with a hard timeout and an address-space limit."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tree_hash

MEMORY_LIMIT = 2 * 1024**3  # address space of the child: plan and check never import torch


def _speedtrain(*args: object, timeout: float = 60, memory: int | None = MEMORY_LIMIT) -> subprocess.CompletedProcess:
    def limit() -> None:
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    cmd = [sys.executable, "-m", "speedtrain", *map(str, args)]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env)


def _one_line(out: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert out.returncode == code, (out.returncode, out.stderr[-2000:], out.stdout[-2000:])
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ds(make_dataset):
    root = make_dataset(4, 2)
    return root, tree_hash(root)


def _first_label(root: Path) -> Path:
    return sorted((root / "labels" / "train").glob("*.txt"))[0]


def test_a_label_that_is_a_link_to_dev_zero_is_reported_not_read(ds):
    root, before = ds
    label = _first_label(root)
    label.unlink()
    label.symlink_to("/dev/zero")
    out = _speedtrain("check", "--dataset", root, "--json", "--workers", 1)
    assert out.returncode == 1, out.stderr  # problems listed
    problems = json.loads(out.stdout)["problems"]
    assert any(p["kind"] == "not-a-label-file" and "a device" in p["detail"] for p in problems)


def test_a_fifo_where_a_label_or_list_is_expected_never_hangs(ds, tmp_path):
    root, _ = ds
    label = _first_label(root)
    label.unlink()
    os.mkfifo(label)
    out = _speedtrain("check", "--dataset", root, "--json", "--workers", 1, timeout=30)
    problems = json.loads(out.stdout)["problems"]
    assert any(p["kind"] == "not-a-label-file" and "FIFO" in p["detail"] for p in problems)
    (root / "train.txt").unlink(missing_ok=True)
    os.mkfifo(root / "train.txt")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "val": "images/val", "nc": 80}))
    _one_line(_speedtrain("plan", "--dataset", root, timeout=30), 3, "train.txt", "FIFO")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_data_yaml_that_is_a_device_or_fifo_is_one_line(ds, target):
    root, _ = ds
    (root / "data.yaml").unlink()
    if target == "fifo":
        os.mkfifo(root / "data.yaml")
    else:
        (root / "data.yaml").symlink_to(target)
    _one_line(_speedtrain("plan", "--dataset", root / "data.yaml", timeout=30), 3, "data.yaml", "not a file")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"nc": 1_000_000_000, "names": None}, ["nc is 1000000000", "100,000"]),
        ({"nc": "four", "names": None}, ["nc is 'four'"]),
        ({"nc": None, "names": None, "label": "999999999 0.5 0.5 0.1 0.1\n"}, ["class id 999999999", "100,000"]),
    ],
    ids=["nc-billion", "nc-word", "class-id-billion"],
)
def test_absurd_class_counts_are_refused_before_names_are_built(ds, change, words):
    root, before = ds
    data = yaml.safe_load((root / "data.yaml").read_text())
    if "label" in change:
        _first_label(root).write_text(change["label"])
        before = tree_hash(root)
    for key in ("nc", "names"):
        if change.get(key, "") is None:
            data.pop(key, None)
        elif key in change:
            data[key] = change[key]
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    before = tree_hash(root)
    _one_line(_speedtrain("plan", "--dataset", root), 3, *words)
    assert tree_hash(root) == before


def test_a_python_tag_in_the_yaml_is_refused_and_nothing_runs(ds, tmp_path):
    root, _ = ds
    marker = tmp_path / "ran"
    (root / "data.yaml").write_text(
        f"train: images/train\nval: images/val\nnc: 80\nx: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    _one_line(_speedtrain("plan", "--dataset", root), 3, "cannot read yaml")
    assert not marker.exists()


def test_a_nan_class_id_is_a_problem_not_a_traceback(ds):
    root, _ = ds
    _first_label(root).write_text("nan 0.5 0.5 0.1 0.1\n")
    out = _speedtrain("check", "--dataset", root, "--json", "--workers", 1)
    problems = json.loads(out.stdout)["problems"]
    assert any(p["kind"] == "class-out-of-range" for p in problems), out.stderr


def test_a_utf8_bom_label_reads_as_ultralytics_reads_it(ds):
    root, _ = ds
    label = _first_label(root)
    label.write_bytes(b"\xef\xbb\xbf" + label.read_bytes())
    out = _speedtrain("check", "--dataset", root, "--json", "--workers", 1)
    problems = json.loads(out.stdout)["problems"]
    assert not [p for p in problems if p["file"] == str(label)], problems


@pytest.mark.parametrize("direction", ["out-is-a-link-to-the-dataset", "dataset-is-a-link-to-out"])
def test_prepare_never_writes_into_the_dataset_through_a_link(ds, tmp_path, direction):
    root, before = ds
    if direction == "out-is-a-link-to-the-dataset":
        dataset, out = root, tmp_path / "link"
        out.symlink_to(root)
    else:
        dataset, out = tmp_path / "link", root
        dataset.symlink_to(root)
    _one_line(_speedtrain("prepare", "--dataset", dataset, "--size", 64, "--out", out), 2, "inside the dataset")
    assert tree_hash(root) == before
    inner = tmp_path / "inner-link"  # a link to a folder inside the dataset
    inner.symlink_to(root / "images")
    _one_line(_speedtrain("prepare", "--dataset", root, "--size", 64, "--out", inner), 2, "inside the dataset")
    assert tree_hash(root) == before


# --- every argument checked before anything is created ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--threads", "1000"], 2, ["--threads 1000", "logical cores; use 1 to"]),
        (["--batch-size", "1", "--nproc-per-node", "2"], 2, ["--batch-size 1", "2 ranks", "--batch-size 2 or more"]),
        (["epochs=-3"], 2, ["--epochs -3", "1 or more"]),
        (["device=7"], 2, ["--device cpu and device=7", "give one"]),  # the flag and key=value disagree
        (["--batch-size", "16", "batch=8"], 2, ["--batch-size 16 and batch=8", "different values"]),
        (["--time", "1h", "time=2"], 2, ["--time 1h and time=2", "give one"]),
        (["batch=8", "batch=4"], 2, ["batch=8 and batch=4", "given twice"]),
        (["--nproc-per-node", "1000"], 2, ["--nproc-per-node 1000", "logical cores", "CPU ranks"]),
        (["--name", "a\nb"], 2, ["--name", "control characters"]),
        (["--device", "mps"], 2, ["--device mps", "use --device cpu"]),
        (["--name", "x" * 300], 2, ["--name", "at most 200 bytes"]),
        (["mosaic=2"], 2, ["mosaic=2", "between 0.0 and 1.0"]),  # Ultralytics' own range check, run up front
        (["fraction=-0.5"], 2, ["fraction=-0.5", "ratio (0, 1]"]),
        (["fraction=0.0"], 2, ["fraction=0.0", "ratio (0, 1]"]),  # checked before the resized copy is made
    ],
    ids=[
        "threads",
        "ranks-over-batch",
        "epochs",
        "device-twice",
        "batch-twice",
        "time-twice",
        "key-twice",
        "ranks-over-cores",
        "control-name",
        "mps",
        "long-name",
        "mosaic-range",
        "fraction",
        "fraction-zero",
    ],
)
def test_impossible_arguments_are_refused_before_a_run_folder_exists(ds, tmp_path, args, code, words):
    if "mps" in args and sys.platform == "darwin":
        pytest.skip("Apple silicon has MPS")
    root, before = ds
    torch_loaded = any(a.startswith(("mosaic=", "fraction=")) for a in args)  # Ultralytics' own checks import it
    out = _speedtrain(
        "train",
        "--dataset",
        root,
        "--device",
        "cpu",
        "--project",
        tmp_path / "runs",
        *args,
        "--prepare",
        "yes",
        memory=None if torch_loaded else MEMORY_LIMIT,
    )
    _one_line(out, code, *words)
    assert not (tmp_path / "runs").exists()  # neither a run folder nor the resized copy's .datasets
    assert tree_hash(root) == before


def test_compare_runs_ultralytics_checks_before_its_folder_exists(ds, tmp_path):
    root, before = ds
    out = _speedtrain(
        "compare",
        "--dataset",
        root,
        "--budget",
        "60s",
        "--device",
        "cpu",
        "--project",
        tmp_path / "runs",
        "hsv_s=3",
        memory=None,
    )
    _one_line(out, 2, "hsv_s=3", "between 0.0 and 1.0")
    assert not (tmp_path / "runs").exists()
    assert tree_hash(root) == before


def test_workers_on_a_cpu_are_not_reported_as_used():
    from conftest import fake_stats, snapshot

    from speedtrain.planner import Overrides, plan

    p = plan(snapshot((), ram=16, cores=2), fake_stats(), Overrides(workers=1000 // 125))
    assert p.stage("main").workers == 0  # Ultralytics loads data in the training process on a CPU
    assert "set by user to 8, but" in p.reason("workers")
    with pytest.raises(Exception, match="--workers 1000: this machine has 16 logical cores; use 0 to 64"):
        plan(snapshot((24,), ram=64, cores=16), fake_stats(), Overrides(workers=1000))


def test_images_sharing_a_label_file_are_reported(ds):
    from PIL import Image

    root, _ = ds
    first = sorted((root / "images" / "train").glob("*.jpg"))[0]
    with Image.open(first) as im:
        im.save(first.with_suffix(".png"))  # a.jpg and a.png: both read a.txt
    out = _speedtrain("check", "--dataset", root, "--json", "--workers", 1)
    shared = [p for p in json.loads(out.stdout)["problems"] if p["kind"] == "shared-label"]
    assert len(shared) == 1
    assert f"{first.name}, {first.with_suffix('.png').name}" in shared[0]["detail"]


def test_prepare_in_place_on_a_read_only_folder_is_one_line(ds, monkeypatch):
    """A read-only mount refuses writes the way os.access reports them (faked: the tests may run as root)."""
    from speedtrain import api, resize
    from speedtrain.errors import UsageError

    root, before = ds
    real = resize.os.access
    monkeypatch.setattr(resize.os, "access", lambda p, mode: False if Path(p).is_relative_to(root) else real(p, mode))
    with pytest.raises(
        UsageError, match="in_place=True: cannot write in .*read-only or not yours.*nothing was changed"
    ):
        api.prepare(root, 64, in_place=True)
    assert tree_hash(root) == before


def test_ranks_import_the_installed_package_not_a_folder_in_the_working_directory():
    from speedtrain import launch

    if sys.version_info >= (3, 11):
        assert launch.RUN_RANK[:3] == ("-P", "-m", "speedtrain.rank")  # -P: no working directory on sys.path
    else:
        assert "sys.path[:]" in launch.RUN_RANK[1]


@pytest.mark.slow
def test_ranks_started_from_a_folder_holding_a_speedtrain_folder_train(make_dataset, tmp_path):
    root = make_dataset(8, 2)
    shadow = tmp_path / "work" / "speedtrain"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the working directory shadowed the package')\n")
    (shadow / "rank.py").write_text("raise SystemExit('the working directory shadowed the package')\n")
    cmd = [
        str(Path(sys.executable).parent / "speedtrain"),
        "train",
        "--dataset",
        str(root),
        "--img-size",
        "64",
        "--epochs",
        "1",
        "--finetune",
        "no",
        "--device",
        "cpu",
        "--nproc-per-node",
        "2",
        "--project",
        str(tmp_path / "runs"),
        "plots=False",
    ]
    out = subprocess.run(cmd, cwd=shadow.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["stages"][0]["status"] == "completed"


# --- images Pillow reads and OpenCV (Ultralytics' loader) does not ------------------------------------------------


def _add_images_opencv_refuses(root: Path) -> tuple[Path, Path]:
    """A real photo saved as a 32-bit float TIFF, and a PNG whose header claims 60000x60000 pixels; each labelled."""
    import struct
    import zlib

    from PIL import Image

    photo = sorted((root / "images" / "train").glob("*.jpg"))[0]
    label = (root / "labels" / "train" / photo.name).with_suffix(".txt")
    floating = root / "images" / "train" / "float.tif"
    with Image.open(photo) as im:
        im.convert("L").convert("F").save(floating)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    huge = root / "images" / "train" / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    for image in (floating, huge):
        shutil.copy(label, (root / "labels" / "train" / image.name).with_suffix(".txt"))
    return floating, huge


def test_images_opencv_cannot_decode_are_reported_and_left_out_of_the_view(ds, tmp_path):
    from speedtrain import dataset, resize

    root, _ = ds
    floating, huge = _add_images_opencv_refuses(root)
    before = tree_hash(root)
    out = _speedtrain("check", "--dataset", root)
    assert "Traceback" not in out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert f"{floating}: Pillow reads it but OpenCV" in text
    assert "training leaves it out" in text
    assert f"{huge}: cannot decode" in text  # Pillow refuses it too, so Ultralytics' own check skips it
    stats = dataset.scan(root)
    assert dataset.opencv_skips(stats) == {str(floating)}  # found by the scan from the TIFF header alone
    view = resize.make_view(stats, tmp_path / "view").parent
    linked = {p.resolve() for p in (view / "images").rglob("*") if p.is_symlink()}
    assert floating not in linked
    assert huge in linked
    assert len(linked) == len(stats.splits[0].image_files) + len(stats.splits[1].image_files) - 1
    assert tree_hash(root) == before


@pytest.mark.slow
def test_a_run_with_images_opencv_cannot_decode_trains_without_them(ds, tmp_path):
    root, _ = ds
    _add_images_opencv_refuses(root)
    before = tree_hash(root)
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        "--dataset",
        str(root),
        "--img-size",
        "64",
        "--epochs",
        "1",
        "--finetune",
        "no",
        "--device",
        "cpu",
        "--project",
        str(tmp_path / "runs"),
        "plots=False",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["stages"][0]["status"] == "completed"
    assert tree_hash(root) == before


def test_a_closed_standard_output_is_one_line_not_a_silent_success(ds):
    root, before = ds
    cmd = [sys.executable, "-m", "speedtrain", "plan", "--dataset", str(root)]
    out = subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        pass_fds=(),
        close_fds=True,
        preexec_fn=lambda: os.close(1),
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: standard output is closed, so the plan and the report would be lost; redirect it instead (> run.log)"
    ]
    assert tree_hash(root) == before


@pytest.mark.parametrize("command", [["probe"], ["plan", "--json"], ["check"]])
def test_an_output_on_a_full_disk_is_one_line_not_a_traceback(ds, command):
    root, before = ds
    args = [*command, "--dataset", str(root)] if command[0] != "probe" else command
    with open("/dev/full", "w") as full:  # a real device whose every write fails with ENOSPC
        out = subprocess.run(
            [sys.executable, "-m", "speedtrain", *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (  # after check's progress line, which goes to stderr
        "error: cannot write to standard output (No space left on device): the disk under it is full, or it was closed"
    )
    assert tree_hash(root) == before
