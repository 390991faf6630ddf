"""Every command through typer's CliRunner, every bad input, and the import-cost promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from speedtrain import hardware
from speedtrain.cli import app
from speedtrain.hardware import Gpu

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped, so assertions see whole reasons


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def gpu_box(tmp_path) -> Path:
    """A snapshot file of a machine with one 24 GB GPU, as `probe --json` writes it."""
    snap = hardware.probe(tmp_path)
    snap = type(snap)(**{**{f: getattr(snap, f) for f in snap.__slots__}, "gpus": (Gpu(0, "RTX 4090", 24, 23),)})
    return hardware.save(snap, tmp_path / "box.json")


def test_probe_table_and_json(tmp_path):
    result = invoke("probe")
    assert result.exit_code == 0
    assert "RAM" in result.output
    assert "CPU" in result.output
    result = invoke("probe", "--json", "--save", tmp_path / "me.json")
    doc = json.loads(result.output)
    assert doc["cpu_cores_logical"] >= 1
    assert isinstance(doc["gpus"], list)
    assert hardware.load(tmp_path / "me.json").ram_total_gb == doc["ram_total_gb"]


def test_plan_on_the_embedded_sample():
    result = invoke("plan")
    assert result.exit_code == 0, result.output
    assert "Plan: yolo26n on cpu" in result.output
    assert "a short demo on the embedded sample" in result.output


def test_plan_json_for_another_machine(gpu_box, make_dataset):
    result = invoke("plan", "--dataset", make_dataset(4, 2), "--hardware", gpu_box, "--json", "mosaic=0.5")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    main = doc["stages"][0]
    assert (doc["device"], main["batch"], main["batch_fallbacks"], main["extra"]) == (
        "0",
        48,
        [32, 16, 8],
        {"mosaic": 0.5},
    )
    assert doc["hardware"]["gpus"][0]["name"] == "RTX 4090"
    assert doc["dataset"]["train_images"] == 4


def test_original_workflow_flags(make_dataset):
    args = ["--dataset", make_dataset(20, 2), "--epochs", 50, "--batch-size", 16, "--img-size", 416]
    result = invoke("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    main = doc["stages"][0]
    assert (main["epochs"], main["batch"], main["imgsz"]) == (50, 16, 416)
    assert main["batch_fallbacks"] == [8, 4]  # on CPU the chain below a user batch continues to 4
    assert doc["reasons"]["batch"] == doc["reasons"]["epochs"] == doc["reasons"]["imgsz"] == "set by user"


def test_a_batch_beyond_the_dataset_is_clamped_with_the_reason(make_dataset):
    result = invoke("plan", "--dataset", make_dataset(4, 2), "--batch-size", 32, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["stages"][0]["batch"], doc["stages"][0]["batch_fallbacks"]) == (4, [])
    assert doc["reasons"]["batch"] == "set by user; clamped to 4: the dataset has 4 training images"


def test_img_size_not_multiple_of_32_is_rounded_with_a_warning(make_dataset):
    result = invoke("plan", "--dataset", make_dataset(2, 1), "--img-size", 100)
    assert result.exit_code == 0
    assert "--img-size 100 is not a multiple of 32; using 128" in result.output


@pytest.mark.slow
def test_train_and_report(make_dataset, tmp_path):
    import torch

    threads_before = torch.get_num_threads()
    args = [
        "train",
        "--dataset",
        make_dataset(6, 2),
        "--img-size",
        64,
        "--epochs",
        1,
        "--finetune-img-size",
        96,
        "--finetune",
        "ask",
    ]
    result = invoke(*args, "--project", tmp_path / "runs", "--name", "cli", "plots=False")
    assert result.exit_code == 0, result.output
    report_path = tmp_path / "runs" / "cli" / "speed_report.json"
    doc = json.loads(report_path.read_text())
    assert doc["stages"][0]["status"] == "completed"
    # --finetune ask with nobody at the terminal: decided as auto decides (from scratch in one epoch nothing is
    # learned, so nothing to refine), and the report says why
    assert doc["stages"][1]["status"] == "skipped"
    assert "not asked (no interactive terminal)" in doc["stages"][1]["note"]
    assert "Measured on this machine" in result.output
    # CPU training ran with the plan's torch threads (read inside the training process, not copied from the plan)
    # and the process got its own thread count back afterwards
    main = doc["stages"][0]
    assert main["threads"] == doc["hardware"]["cpu_cores_physical"]
    assert main["measured"]["threads"] == main["threads"]
    assert torch.get_num_threads() == threads_before
    again = invoke("report", tmp_path / "runs" / "cli")
    assert again.exit_code == 0
    assert "Measured on this machine" in again.output
    assert json.loads(invoke("report", report_path, "--json").output) == doc


def _yaml(root: Path, data) -> Path:
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


def _bad_label(root: Path) -> Path:
    next((root / "labels" / "train").iterdir()).write_text("99 0.5 0.5 0.1 0.1\n")
    return root


def _empty_val(root: Path) -> Path:
    for p in (root / "images" / "val").iterdir():
        p.unlink()
    return root


BAD_INPUTS = [
    # (id, how to break a fresh dataset, extra args, expected exit code, message)
    ("missing-dataset", lambda r: r / "nope", [], 3, "dataset not found"),
    (
        "yaml-without-val",
        lambda r: _yaml(r, {"train": "images/train", "nc": 80}),
        [],
        3,
        "missing required key(s): val",
    ),
    ("empty-split", _empty_val, [], 3, "val split has no images"),
    ("class-outside-names", _bad_label, [], 3, "class id 99 outside 0..79"),
    ("batch-zero", lambda r: r, ["--batch-size", "0"], 2, "--batch-size 0: must be a positive"),
    ("batch-negative", lambda r: r, ["--batch-size", "-8"], 2, "--batch-size -8"),
    ("unknown-device", lambda r: r, ["--device", "7"], 2, "--device 7: GPU 7 does not exist"),
    ("device-garbage", lambda r: r, ["--device", "tpu"], 2, "expected cpu, mps"),
    ("unknown-extra-arg", lambda r: r, ["mosiac=0.5"], 2, "mosiac= is not an Ultralytics train argument"),
    ("reserved-extra-arg", lambda r: r, ["data=coco.yaml"], 2, "use --dataset"),
    ("not-key-value", lambda r: r, ["stray"], 2, "extra Ultralytics arguments look like key=value"),
]


@pytest.mark.parametrize("command", ["plan", "train"])
@pytest.mark.parametrize(
    ("breaker", "extra", "code", "message"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_an_exit_code(make_dataset, tmp_path, command, breaker, extra, code, message):
    root = breaker(make_dataset(3, 1))
    result = (
        invoke(command, "--dataset", root, "--project", tmp_path / "runs", *extra)
        if command == "train"
        else invoke(command, "--dataset", root, *extra)
    )
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_bad_hardware_file_and_missing_report(tmp_path):
    (tmp_path / "hw.json").write_text("{broken")
    result = invoke("plan", "--hardware", tmp_path / "hw.json")
    assert result.exit_code == 4
    assert "cannot read a hardware snapshot" in result.stderr
    result = invoke("report", tmp_path)
    assert result.exit_code == 1
    assert "no speed_report.json" in result.stderr
    assert "Traceback" not in result.output


def test_bad_choice_is_a_usage_error_without_traceback():
    result = invoke("plan", "--cache", "fast")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_every_command_has_help_with_an_example():
    for name in ("probe", "plan", "train", "report"):
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        assert "Example:" in result.output, name


def test_python_dash_m_help_runs():
    out = subprocess.run([sys.executable, "-m", "speedtrain", "--help"], capture_output=True, text=True, check=True)
    assert "probe" in out.stdout
    assert "train" in out.stdout


def test_train_py_shim_help():
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, check=True)
    assert "--batch-size" in out.stdout
    assert "--img-size" in out.stdout


def test_help_probe_and_plan_import_neither_torch_nor_ultralytics():
    code = (
        "import sys\n"
        "from speedtrain.cli import app\n"
        "for args in (['--help'], ['probe', '--json'], ['plan', '--json']):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_check_command_exit_codes(make_dataset):
    root = make_dataset(3, 1)
    clean = invoke("check", "--dataset", root)
    assert clean.exit_code == 0, clean.output
    assert "no problems found" in clean.output
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    found = invoke("check", "--dataset", root, "--json")
    assert found.exit_code == 1
    assert [p["kind"] for p in json.loads(found.output)["problems"]] == ["label-without-image"]


def test_prepare_command(make_dataset, tmp_path):
    result = invoke("prepare", "--dataset", make_dataset(3, 1), "--size", 256, "--out", tmp_path / "small", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["resized"], summary["size"]) == (4, 256)
    assert (tmp_path / "small" / "data.yaml").is_file()
    assert invoke("prepare", "--dataset", tmp_path / "missing").exit_code == 3


@pytest.mark.slow
def test_train_prepares_the_dataset_when_images_are_much_larger(make_dataset, tmp_path):
    root = make_dataset(6, 2)
    args = ["train", "--dataset", root, "--img-size", 64, "--epochs", 1, "--finetune", "no"]
    result = invoke(*args, "--project", tmp_path / "runs", "plots=False")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    prep = doc["prepare"]
    assert prep["decision"].startswith("resize to 64 px")
    assert prep["summary"]["resized"] == 8
    assert prep["load_ms_original"] > prep["load_ms_prepared"] > 0  # measured, not assumed
    assert prep["original_dataset"]["root"] == str(root)
    assert doc["dataset"]["image_size"]["max_long_side"] == 64  # trained on the copy
    assert "Preparation" in result.output


def test_optimize_training_speed_shim(make_dataset):
    root = make_dataset(3, 1)
    script = str(REPO / "optimize_training_speed.py")
    out = subprocess.run(
        [sys.executable, script, "--resize", "--dataset", str(root), "--size", "320"], capture_output=True
    )
    assert out.returncode == 0, out.stderr
    assert (root.with_name("ds_320") / "data.yaml").is_file()
    check = subprocess.run([sys.executable, script, "--check", "--dataset", str(root)], capture_output=True)
    assert check.returncode == 0, check.stderr
    nothing = subprocess.run([sys.executable, script, "--dataset", str(root)], capture_output=True, text=True)
    assert nothing.returncode == 2
    assert "--resize, --check" in nothing.stderr


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["train", "--epoch", "2"], 2, "no such option --epoch; did you mean --epochs?"),
        (["plan", "--batchsize", "8"], 2, "did you mean --batch-size?"),
        (["compare", "--bugdet", "3m"], 2, "did you mean --budget?"),
        (["train", "lr=0.01"], 2, "lr= is not an Ultralytics train argument; did you mean lrf= or lr0=?"),
        (["tune", "epoch=3"], 2, "did you mean epochs=?"),
        (["train", "--zzz"], 2, "no such option --zzz; Ultralytics arguments are written key=value"),
        (["train", "--dataset", "/no/such/dataset"], 3, "dataset not found: /no/such/dataset"),
    ],
)
def test_argument_errors_suggest_and_come_before_torch_is_imported(args, code, says):
    """One line with the closest valid name, and no second spent importing torch or Ultralytics first."""
    probe = (
        "import sys\nfrom speedtrain.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules, 'ultralytics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(code), "False", "False"], out.stderr
    assert says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_log_hears_from_a_long_epoch_every_30_seconds(monkeypatch):
    """Piped output: a line at least every LOG_EVERY_S during an epoch (batch k/n, ETA), and one per finished epoch."""
    import io

    from speedtrain import cli
    from speedtrain.records import StageProgress

    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with cli._run_display(cli._Console(file=out, width=120)) as show:
        for second, batch in ((0, 1), (10, 2), (29, 3), (31, 4), (50, 5), (62, 6)):
            clock[0] = 1000.0 + second
            show(StageProgress("main", 0, 3, batch / 10, None, None, batch=batch, batches=10))
        clock[0] = 1100.0
        show(StageProgress("main", 0, 3, 1.0, 12.5, 0.25, epoch_done=True, batch=10, batches=10))
    lines = out.getvalue().splitlines()
    # at 31 s: 4 of 10 batches took 31 s, so about 46 s are left; at 62 s: 6 of 10 in 62 s, about 41 s left
    assert lines == [
        "main: epoch 1/3 batch 4/10, about 0m 46s left in this epoch (estimate)",
        "main: epoch 1/3 batch 6/10, about 0m 41s left in this epoch (estimate)",
        "main: epoch 1/3  12.5 img/s  mAP50-95 0.250",
    ]


def test_an_epoch_that_starts_again_under_the_same_name_is_timed_from_its_own_start(monkeypatch):
    """A compare arm's fine-tune reports under the arm's name, from epoch 1 again, 15 minutes after the main stage's
    epoch 1 began (and an OOM retry restarts an epoch): its estimate counts from its own start, not the first's."""
    import io

    from speedtrain import cli
    from speedtrain.records import StageProgress

    clock = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with cli._run_display(cli._Console(file=out, width=120)) as show:
        for second, batch in ((0, 1), (40, 10)):
            clock[0] = second
            show(StageProgress("plan+finetune", 0, 15, batch / 10, None, None, batch=batch, batches=10))
        clock[0] = 900.0
        show(StageProgress("plan+finetune", 14, 15, 1.0, 19.9, 0.468, epoch_done=True, batch=10, batches=10))
        for second, batch in ((900, 1), (960, 4), (1000, 8), (1040, 2)):  # the fine-tune, then a retry
            clock[0] = second
            show(StageProgress("plan+finetune", 0, 25, batch / 10, None, None, batch=batch, batches=10))
        clock[0] = 1080.0
        show(StageProgress("plan+finetune", 0, 25, 0.4, None, None, batch=4, batches=10))
    # the fine-tune's batch 4 at 60 s from its start: 90 s left (not 2,160 s, counted from the main stage's start)
    assert out.getvalue().splitlines() == [
        "plan+finetune: epoch 1/15 batch 10/10, about 0m 00s left in this epoch (estimate)",
        "plan+finetune: epoch 15/15  19.9 img/s  mAP50-95 0.468",
        "plan+finetune: epoch 1/25 batch 4/10, about 1m 30s left in this epoch (estimate)",
        "plan+finetune: epoch 1/25 batch 8/10, about 0m 25s left in this epoch (estimate)",
        "plan+finetune: epoch 1/25 batch 2/10",  # the retry's first batch: nothing timed yet
        "plan+finetune: epoch 1/25 batch 4/10, about 1m 00s left in this epoch (estimate)",
    ]


# sitecustomize: a short prompt (3 s when nothing is typed; long enough for a busy machine when keys are typed)
SHORT_PROMPT = "import os, speedtrain.cli\nspeedtrain.cli.PROMPT_TIMEOUT_S = float(os.environ['PROMPT_S'])\n"


def _train_in_a_terminal(args: list[str], keys: bytes | None, tmp_path: Path) -> tuple[int, str]:
    """Run `speedtrain train ARGS` under a pseudo-terminal; type `keys` at the fine-tune prompt (None: nothing)."""
    import pty
    import re
    import select

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SHORT_PROMPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(hook),
        "COLUMNS": "120",
        "TERM": "xterm",
        "PROMPT_S": "3" if keys is None else "60",
    }
    pid, fd = pty.fork()
    if pid == 0:  # the child: speedtrain with the pseudo-terminal as its stdin, stdout and stderr
        os.execve(sys.executable, [sys.executable, "-m", "speedtrain", "train", *args], env)
    out, typed, deadline = b"", False, time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal: it ended
                break
            if not chunk:
                break
            out += chunk
        if not typed and b"Fine-tune at" in out:
            typed = True
            if keys is not None:
                time.sleep(0.3)
                os.write(fd, keys)
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("keys", "code", "finetune", "says"),
    [
        (b"y\n", 0, "completed", ""),
        (b"n\n", 0, "skipped", "declined at the prompt"),
        (b"\x04", 0, "skipped", "no (end of input)"),  # Ctrl-D: end of input
        (b"\x03", 130, "skipped", "no (Ctrl-C): the run ends here; its report follows"),
        (None, 0, "skipped", "n (no answer in 3 s)"),  # the default: auto's decision (nothing learned: no)
    ],
    ids=["yes", "no", "eof", "ctrl-c", "timeout"],
)
def test_the_finetune_prompt_never_blocks_and_never_loses_the_report(
    make_dataset, tmp_path, keys, code, finetune, says
):
    args = [
        "--dataset",
        str(make_dataset(4, 2)),
        "--img-size",
        "64",
        "--epochs",
        "1",
        "--finetune",
        "ask",
        "--finetune-img-size",
        "96",
        "--finetune-epochs",
        "1",
        "--project",
        str(tmp_path / "runs"),
        "plots=False",
    ]
    exit_code, out = _train_in_a_terminal(args, keys, tmp_path)
    assert exit_code == code, out[-3000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["run"]["status"] == "finished"  # final, not "running": `report` does not call it killed
    assert doc["stages"][1]["status"] == finetune
    assert says in out
    lines = [line.split("\r")[-1] for line in out.splitlines()]
    assert any(line.startswith("Main stage mAP50-95:") for line in lines), out[-3000:]  # on its own line
    assert "Measured on this machine" in out  # the report was printed
    assert (tmp_path / "runs" / "train" / "speed_report.png").is_file()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--epochs", "0"], "Invalid value for '--epochs'"),
        (["train", "--cache", "rom"], "'rom' is not one of 'ram', 'disk', 'none'. Did you mean 'ram'?"),
        (["trian"], "No such command 'trian'. Did you mean 'train'?"),
        (["report"], "Missing argument"),
    ],
)
def test_click_usage_errors_are_one_line_with_a_suggestion(args, says):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert says in lines[0]
    assert lines[0].endswith("-h)")
