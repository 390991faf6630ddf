"""Bad and unusual input: one clear line and its exit code, never a traceback, a hang or runaway memory, and the
dataset byte for byte unchanged. Datasets are built from real COCO photos in temporary folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, tree_hash
from typer.testing import CliRunner

from speedtrain import planner, workflow
from speedtrain.cli import app

BOMB = """train: images/train
val: images/val
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
names: *i
"""


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def one_line_error(result, code: int, *words: str) -> str:
    """The CLI failed with `code` and one stderr line holding every word, and no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output[-2000:])
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_an_alias_bomb_yaml_is_refused_fast_and_small(tmp_path):
    """A few hundred bytes of nested aliases expand to 9^9 values: refused in well under 2 s and 200 MB."""
    (tmp_path / "data.yaml").write_text(BOMB)
    code = (
        "import resource, sys, time\n"
        "from speedtrain.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        f"    main(['plan', '--dataset', {str(tmp_path)!r}])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024\n"
        "print(code, round(time.perf_counter() - t0, 3), round(grown, 1))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exit_code, seconds, grown_mb = done.stdout.split()
    assert exit_code == "3"
    assert float(seconds) < 2.0
    assert float(grown_mb) < 200
    assert "aliases expand to more than 100,000 values" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_oversized_yaml_is_refused(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/val\n# " + "x" * (1024**2 + 10) + "\n")
    one_line_error(CliRunner().invoke(app, ["plan", "--dataset", str(tmp_path)]), 3, "too large for a dataset yaml")


def test_an_absurd_image_size_is_refused_before_any_allocation(make_dataset):
    root = make_dataset(4, 1)
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["train", "--dataset", str(root), "--img-size", "100000"])
    one_line_error(result, 2, "--img-size 100000", "GB for its input tensor alone")
    assert time.perf_counter() - t0 < 5  # refused at planning: nothing was decoded, nothing trained


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("notes.pt", b"these are my notes\n", ("not a PyTorch checkpoint (found text)",)),
        ("empty.pt", b"", ("found an empty file",)),
        ("model.yaml", b"nc: 80\nscales: {}\n", ("not a YOLO model yaml",)),
        ("bomb.yaml", BOMB.encode(), ("aliases expand",)),
        ("weights.txt", b"0.1 0.2\n", ("a .txt file; expected a .pt checkpoint or a model .yaml",)),
    ],
    ids=["text-as-pt", "empty-pt", "yaml-without-backbone", "alias-bomb-model", "other-suffix"],
)
def test_a_model_file_that_is_not_a_model_is_one_line(make_dataset, tmp_path, name, content, words):
    root = make_dataset(4, 1)
    before = tree_hash(root)
    model = tmp_path / name
    model.write_bytes(content)
    result = CliRunner().invoke(app, ["plan", "--dataset", str(root), "--model", str(model)])
    one_line_error(result, 2, str(model), *words)
    assert tree_hash(root) == before


def test_a_model_folder_is_one_line(tmp_path):
    one_line_error(CliRunner().invoke(app, ["plan", "--model", str(tmp_path)]), 2, "a folder")


@pytest.mark.parametrize(
    ("arg", "words"),
    [
        ("lr0=abc", ("lr0=abc: expected a number",)),
        ("epochs=1.5", ("epochs=1.5: expected a whole number",)),
        ("mosaic=yes", ("mosaic=yes: expected a number",)),  # yaml reads "yes" as a string, not a number
        ("amp=maybe", ("amp=maybe: expected True or False",)),
    ],
)
def test_an_ultralytics_argument_of_the_wrong_type_is_refused_before_training(arg, words):
    one_line_error(CliRunner().invoke(app, ["plan", arg]), 2, *words)


def test_argument_types_follow_ultralytics_defaults():
    known = {"lr0": 0.01, "epochs": 100, "amp": True, "optimizer": "auto", "name": None}
    assert planner.parse_extra_args(["lr0=1", "epochs=3", "amp=False", "optimizer=SGD"], known) == (
        ("lr0", 1),
        ("epochs", 3),
        ("amp", False),
        ("optimizer", "SGD"),
    )


def test_project_that_is_a_file_and_a_name_that_escapes(make_dataset, tmp_path):
    root = make_dataset(4, 1)
    afile = tmp_path / "runs.txt"
    afile.write_text("not a folder")
    args = ["train", "--dataset", str(root), "--img-size", "64", "--epochs", "1", "--finetune", "no"]
    one_line_error(CliRunner().invoke(app, [*args, "--project", str(afile)]), 2, "--project", "cannot hold run folders")
    result = CliRunner().invoke(app, [*args, "--project", str(tmp_path / "p"), "--name", "../.."])
    one_line_error(result, 2, "--name '../..'", "stays inside --project")
    assert not any(tmp_path.parent.glob("train*"))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", ("cannot read a speed report",)),
        (json.dumps({"stages": "main"}), ("not a complete speedtrain speed report",)),
        (json.dumps({"stages": [{"name": "main"}], "reasons": {}}), ("not a complete speedtrain speed report",)),
    ],
    ids=["corrupt", "stages-not-a-list", "stage-without-fields"],
)
def test_report_on_a_broken_file_is_one_line(tmp_path, content, words):
    (tmp_path / "speed_report.json").write_text(content)
    code = 1
    one_line_error(CliRunner().invoke(app, ["report", str(tmp_path)]), code, *words)


def test_a_dataset_of_background_images_only_is_refused_before_training(make_dataset):
    root = make_dataset(4, 1)
    for label in (root / "labels").rglob("*.txt"):
        label.write_text("")  # every image a background
    before = tree_hash(root)
    result = CliRunner().invoke(app, ["train", "--dataset", str(root), "--img-size", "64", "--epochs", "1"])
    one_line_error(result, 3, "none of the 4 training images has a usable box")
    check = CliRunner().invoke(app, ["check", "--dataset", str(root)])
    assert check.exit_code == 1
    assert "no-labels" in check.output
    assert tree_hash(root) == before


def test_the_one_click_script_and_train_py_plan_the_same_demo():
    """./quick_train_ultra_fast.sh passes the sample's path; python train.py passes none: both are the demo."""
    sample = REPO / "speedtrain" / "sample"
    assert workflow.is_sample(None)
    assert workflow.is_sample(sample)
    assert workflow.is_sample(sample / "data.yaml")
    by_path = workflow.make_plan(sample, planner.Overrides(finetune="no", prepare="no")).plan
    default = workflow.make_plan(None, planner.Overrides(finetune="no", prepare="no")).plan
    assert by_path.stages[0].epochs == default.stages[0].epochs == planner.SAMPLE_EPOCHS[0]


def _as_txt_lists(root):
    """The dataset rewritten as COCO's yaml does it: splits are .txt files of ./-relative image paths."""
    import yaml

    for split in ("train", "val"):
        images = sorted((root / "images" / split).glob("*.jpg"))
        (root / f"{split}.txt").write_text("".join(f"./images/{split}/{p.name}\n" for p in images))
    data = yaml.safe_load((root / "data.yaml").read_text())
    data.update(train="train.txt", val="val.txt")
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


@pytest.mark.slow
def test_a_txt_list_dataset_works_everywhere(make_dataset, tmp_path):
    """train (with the automatic pre-resize), prepare, check and --pipeline fast all take splits given as lists."""
    root = _as_txt_lists(make_dataset(6, 2))
    before = tree_hash(root)
    runner = CliRunner()
    check = runner.invoke(app, ["check", "--dataset", str(root)])
    assert check.exit_code == 0, check.output[-2000:]
    prepared = runner.invoke(app, ["prepare", "--dataset", str(root), "--size", "96", "--out", str(tmp_path / "p")])
    assert prepared.exit_code == 0, prepared.output[-2000:]
    assert (tmp_path / "p" / "train.txt").read_text().count("./images/train/") == 6  # the copy lists its copies
    base = ["train", "--img-size", "64", "--epochs", "1", "--finetune", "no", "plots=False"]
    # the default --prepare auto resizes these 640-px photos for 64-px training; then the fast pipeline
    for dataset, extra in ((root, ["--prepare", "auto"]), (tmp_path / "p", ["--pipeline", "fast"])):
        project = tmp_path / f"runs-{len(extra)}-{extra[-1]}"
        result = runner.invoke(app, [*base, "--dataset", str(dataset), "--project", str(project), *extra])
        assert result.exit_code == 0, result.output[-3000:]
        doc = json.loads((project / "train" / "speed_report.json").read_text())
        assert doc["stages"][0]["measured"]["images_per_epoch"] == 6
    assert tree_hash(root) == before


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_a_piped_run_reads_clean(make_dataset, tmp_path, verbose):
    """The console shows the plan once, a line per epoch and the report; Ultralytics' own ~100 lines (argument
    dump, layer table, progress bars) go to RUN_DIR/ultralytics.log, or to the console with --verbose. In a file
    or pipe (CI logs, SLURM) nothing carries colour codes, which Ultralytics writes unconditionally."""
    root = make_dataset(4, 1)
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
        "2",
        "--finetune",
        "no",
        "--project",
        str(tmp_path / "runs"),
        "plots=False",
    ]
    cmd += ["--verbose"] if verbose else []
    env = {**os.environ, "YOLO_VERBOSE": "True"}  # the tests run Ultralytics quiet; here its log is the point
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    log = tmp_path / "runs" / "train" / "ultralytics.log"
    assert "\x1b[" not in console
    assert console.count("Plan: ") == 1  # shown before the run, not again in the final report
    if verbose:
        assert "Starting training" in console
        assert not log.exists()
    else:
        assert "Starting training" not in console
        assert "Starting training" in log.read_text()
        assert "\x1b[" not in log.read_text()
        assert [ln.split("  ")[0] for ln in console.splitlines() if ln.startswith("main: epoch")] == [
            "main: epoch 1/2",
            "main: epoch 2/2",
        ]
        assert f"Ultralytics' full log: {log}" in console.replace("\n", " ")


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        ("0 nan 0.5 0.1 0.1\n", "coords-not-finite"),
        (b"\x00\x01\x02 binary".decode("latin-1"), "not-a-label-file"),
    ],
    ids=["nan", "binary"],
)
def test_check_finds_what_training_would_trip_on(make_dataset, content, kind):
    root = make_dataset(4, 1)
    label = sorted((root / "labels" / "train").iterdir())[0]
    label.write_text(content, encoding="latin-1")
    result = CliRunner().invoke(app, ["check", "--dataset", str(root), "--json"])
    assert result.exit_code == 1
    kinds = {p["kind"] for p in json.loads(result.stdout)["problems"]}
    assert kind in kinds


def test_a_huge_label_file_is_reported_not_loaded(make_dataset, monkeypatch):
    from speedtrain import dataset

    root = make_dataset(4, 1)
    monkeypatch.setattr(dataset, "LABEL_MAX_BYTES", 1000)  # a 1 KB limit stands for the 4 MB one
    label = sorted((root / "labels" / "train").iterdir())[0]
    label.write_text("0 0.5 0.5 0.1 0.1\n" * 100)
    stats = dataset.scan(root)
    assert any(p.kind == "not-a-label-file" and "too large" in p.detail for p in stats.problems)


def test_val_being_the_training_images_is_noted(make_dataset):
    import yaml

    from speedtrain import dataset

    root = make_dataset(4, 1)
    data = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump({**data, "val": data["train"]}))
    assert any("val is the training images" in n for n in dataset.scan(root).notes)


def test_interrupting_prepare_talks_about_prepare(make_dataset, monkeypatch):
    from speedtrain import resize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resize, "resize_dataset", interrupted)
    result = CliRunner().invoke(app, ["prepare", "--dataset", str(make_dataset(4, 1))])
    assert result.exit_code == 130
    assert "run the same prepare again" in result.stderr
    assert "--resume" not in result.stderr


def test_a_killed_runs_report_does_not_say_finished(tmp_path):
    from speedtrain import SpeedReport

    doc = json.loads((REPO / "tests" / "data" / "speed_report.json").read_text())
    doc["run"] = {**doc.get("run", {}), "status": "running", "run_dir": str(tmp_path)}
    (tmp_path / "speed_report.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0
    assert "Run stopped before it finished" in result.output
    assert "Run finished" not in result.output
    assert SpeedReport.from_json(tmp_path).run.status == "running"


def test_json_inputs_are_bounded(tmp_path, monkeypatch):
    from speedtrain import SpeedReport, hardware, util
    from speedtrain.errors import HardwareError, SpeedtrainError

    monkeypatch.setattr(util, "JSON_MAX_BYTES", 100)  # the one bound every JSON input is read under
    big = tmp_path / "speed_report.json"
    big.write_text(json.dumps({"stages": [], "pad": "x" * 200}))
    with pytest.raises(SpeedtrainError, match="too large for a speed report"):
        SpeedReport.from_json(big)
    with pytest.raises(HardwareError, match="too large for a hardware snapshot"):
        hardware.load(big)


def test_missing_names_with_relative_splits_count_classes_from_the_labels(make_dataset):
    import yaml

    from speedtrain import dataset

    root = make_dataset(4, 1)
    data = yaml.safe_load((root / "data.yaml").read_text())
    del data["names"]
    (root / "data.yaml").write_text(yaml.safe_dump(data))  # train: images/train, relative to the yaml's folder
    names = dataset.scan(root).names
    assert names[0] == "class0"
    assert len(names) > 1  # read from the labels, which exist, whatever the working directory


def test_a_dataset_folder_starting_with_a_dash(make_dataset, tmp_path, monkeypatch):
    make_dataset(4, 1).rename(tmp_path / "-ds")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", "--dataset", "-ds", "--json"])  # the value of --dataset, not a flag
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dataset"]["train_images"] == 4


def test_prepare_with_a_quality_it_cannot_write_is_one_line(make_dataset, tmp_path):
    root = make_dataset(2, 1)
    result = CliRunner().invoke(
        app, ["prepare", "--dataset", str(root), "--quality", "best", "--out", str(tmp_path / "p")]
    )
    one_line_error(result, 2, "--quality best", "from 1 to 100, or auto")
    assert not (tmp_path / "p").exists()
