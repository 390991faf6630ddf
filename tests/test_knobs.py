"""Each planned knob is declared once (speedtrain/knobs.py): these tests fail when one is only half added. Every
knob needs an example here; with it, each is checked end to end: its flag on every command that declares it reaches
the API under its keyword, the planner changes the plan for it, the rendered plan shows it where it says, and
Ultralytics gets it under its own argument name (also when written key=value)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from conftest import fake_stats, snapshot
from rich.console import Console
from test_cli_args import calls, invoke  # noqa: F401 -- the API recorder fixture

from speedtrain import api, cli, knobs, planner, render
from speedtrain.errors import UsageError
from speedtrain.knobs import KNOBS, Overrides

# knob: (command-line tokens, the API's value, what the rendered plan shows, the value Ultralytics gets)
EXAMPLES: dict[str, tuple[list[str], Any, str, Any]] = {
    "model": (["--model", "yolo11s.yaml"], "yolo11s.yaml", "Plan: yolo11s.yaml", None),
    "imgsz": (["--img-size", "320"], 320, "320", 320),
    "batch": (["--batch-size", "24"], 24, "24", 24),
    "cache": (["--cache", "disk"], "disk", "disk", "disk"),
    "workers": (["--workers", "3"], 3, "3", 3),
    "epochs": (["--epochs", "7"], 7, "7", 7),
    "optimizer": (["--optimizer", "SGD"], "SGD", "SGD lr0=0.01", "SGD"),
    "lr0": (["--lr0", "0.005"], 0.005, "lr0=0.005", 0.005),
    "rect": (["--rect"], True, "True", True),
    "close_mosaic": (["--close-mosaic", "4"], 4, "4", 4),
    "patience": (["--patience", "9"], 9, "9", 9),
    "val_every": (["--val-every", "3"], "3", "3", None),
    "threads": (["--threads", "3"], 3, "3", None),
    "deterministic": (["--deterministic"], True, "True", True),
    "amp": (["--no-amp"], False, "False", False),
    "pipeline": (["--pipeline", "fast"], "fast", "fast", None),
    "device": (["--device", "0,1"], "0,1", "device: set by user", "0,1"),
    "nproc_per_node": (["--nproc-per-node", "2"], 2, "2 ranks on this node", None),
    # Ultralytics' time= in hours, which fits the epochs to it (with --phases the run keeps its own deadline)
    "time": (["--time", "2h"], "2h", "2h 00m", 1.4),  # the main stage: 70 %, the fine-tune the rest
    "recipe": (["--recipe", "classic"], "classic", "Adam lr0=0.001", None),
    "phases": (["--phases", "416,640"], "416,640", "416 px", None),
    "finetune": (["--finetune", "yes"], "yes", "(--finetune yes)", None),
    "finetune_epochs": (["--finetune-epochs", "4"], 4, "4 epochs at 640", 4),
    "finetune_imgsz": (["--finetune-img-size", "800"], 800, "epochs at 800", 800),
    "target_map": (["--target-map", "0.5"], 0.5, "--target-map 0.5", None),
    "prepare": (["--prepare", "no"], "no", "off (--prepare no)", None),
}
GPUS = snapshot((24, 24), ram=64, cores=16)  # --device 1 picks one of them: rect needs a single rank
NEEDS = {"phases": {"time": "1h"}}  # a knob that only means something beside another one


def _plan(**values: Any) -> planner.TrainPlan:
    device = "cpu" if values.get("nproc_per_node") else "0"  # CPU ranks: one rank per GPU of --device on GPUs
    return planner.plan(GPUS, fake_stats(), Overrides(**{"device": device, **values}))


def test_every_knob_has_an_example():
    assert set(EXAMPLES) == {k.name for k in KNOBS}


def test_every_knob_is_an_option_of_plan_and_train_and_compare_unless_it_says_why():
    for k in KNOBS:
        assert {"plan", "train"} <= set(k.commands), k.name
        skipped = dict(k.not_in)
        assert "compare" in k.commands or skipped["compare"], k.name
    from typer.main import get_command

    from speedtrain.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    for name in ("plan", "train", "compare", "tune"):
        options = {p.name for p in commands[name].params}
        declared = {k.name for k in knobs.for_command(name)}
        assert declared <= options, name
        assert not ({k.name for k in KNOBS} - declared) & options, f"{name} has a knob its declaration leaves out"


@pytest.mark.parametrize(
    ("knob", "command"), [(k, c) for k in KNOBS for c in k.commands], ids=lambda v: getattr(v, "name", v)
)
def test_each_flag_reaches_the_api_as_its_keyword(calls, knob, command, tmp_path, monkeypatch):  # noqa: F811
    got: dict[str, Any] = {}
    monkeypatch.setattr(cli.api, "compare", lambda *a, **kw: got.update(kw) or _stop())
    tokens, value, _, _ = EXAMPLES[knob.name]
    result = invoke(command, "--dataset", tmp_path, *tokens)
    if command == "compare":
        assert got[knob.name] == value, result.output
        return
    assert result.exit_code == 0, result.output
    assert calls[command][1][knob.name] == value


def _stop() -> Any:
    raise UsageError("recorded")


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_each_knob_changes_the_plan_and_the_plan_shows_it(knob):
    _, value, shown, _ = EXAMPLES[knob.name]
    needs = NEEDS.get(knob.name, {})
    default, planned = _plan(**needs), _plan(**needs, **{knob.name: value})
    assert planned != default, f"{knob.name}: the planner has no rule for it"
    text = _rendered(planned)
    if knob.shown == "row":
        row = _row(text, knob.name)
        assert f" {shown} " in row, row
        assert "set by user" in row, row
    else:
        part = {
            "title": "Plan:",
            "optimizer row": "optimizer",
            "time row": "time",
            "device line": "device:",
            "fine-tune line": "fine-tune:",
            "prepare line": "prepare:",
        }[knob.shown]
        assert shown in text[text.index(part) :], f"{knob.name}: {shown!r} not in the plan's {knob.shown}"


@pytest.mark.parametrize("knob", [k for k in KNOBS if k.ultralytics], ids=lambda k: k.name)
def test_each_knob_reaches_ultralytics_under_its_name(knob):
    _, value, _, ultralytics_value = EXAMPLES[knob.name]
    planned = _plan(**{knob.name: value})
    stage = planned.stage(knob.stage)
    assert stage is not None
    if ultralytics_value is None:  # speedtrain keeps it itself
        assert knob.ultralytics not in stage.train_args()
        return
    assert stage.train_args()[knob.ultralytics] == ultralytics_value


@pytest.mark.parametrize("key", sorted(knobs.FROM_ULTRALYTICS))
def test_an_ultralytics_key_value_sets_its_knob(key):
    """`close_mosaic=4` as the yolo command line writes it plans exactly as `--close-mosaic 4`."""
    name = knobs.FROM_ULTRALYTICS[key]
    value = EXAMPLES[name][1]
    unset = {"device": None} if name == "device" else {}  # the helper's own --device would contradict device=
    assert _plan(extra=((key, value),), **unset) == _plan(**{name: value})


def test_every_row_knob_has_a_reason_in_a_default_plan():
    reasons = dict(_plan().reasons)
    for name, *_ in knobs.table_rows():
        assert reasons.get(name) or name == "cos_lr" and reasons.get("lr0"), name


def test_choices_come_from_the_declaration():
    assert api.CHOICES["cache"] == ("ram", "disk", "none")
    with pytest.raises(UsageError, match=r"cache='rma': expected one of ram, disk, none"):
        api.overrides({"cache": "rma"})
    result = invoke("plan", "--cache", "rma")
    assert result.exit_code == 2
    assert "Did you mean 'ram'?" in result.output


def test_close_mosaic_rule():
    """The knob added by following "How to add a knob": Ultralytics' 10 unless set, never more than the epochs."""
    assert _plan().stages[0].close_mosaic == 10
    assert _plan(epochs=6).stages[0].close_mosaic == 6
    main, finetune = _plan(close_mosaic=0, finetune="yes").stages
    assert (main.close_mosaic, finetune.close_mosaic) == (0, 0)
    assert _plan(close_mosaic=0).reason("close_mosaic") == "set by user: mosaic to the end"
    with pytest.raises(UsageError, match="--close-mosaic -1"):
        _plan(close_mosaic=-1)


def test_amp_rule():
    """Mixed precision on a GPU unless turned off; never on a CPU, where Ultralytics trains in full precision."""
    assert _plan().stages[0].amp is True
    assert _plan(amp=False).stages[0].amp is False
    assert all(not s.amp for s in _plan(amp=False, finetune="yes").stages)
    cpu = planner.plan(snapshot(()), fake_stats(), Overrides(amp=True))
    assert cpu.stages[0].amp is False
    assert cpu.reason("amp") == "set by user, but AMP is for GPUs; off on CPU"


def _rendered(plan: planner.TrainPlan) -> str:
    out = io.StringIO()
    Console(file=out, width=2000, color_system=None).print(render.render_plan(plan))
    return out.getvalue()


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.strip(" |│┃").startswith(f"{name} "))


def test_the_docs_knob_table_is_the_declaration():
    from conftest import REPO

    assert knobs.markdown_table() in (REPO / "docs" / "plan.md").read_text(encoding="utf-8")


def test_a_mistyped_keyword_gets_the_knobs_name():
    with pytest.raises(UsageError, match=r"finetune_img_size= .* did you mean finetune_imgsz=\?"):
        api.overrides({"finetune_img_size": 800})
    with pytest.raises(UsageError, match=r"mosaik= is not an Ultralytics train argument; did you mean mosaic=\?"):
        api.overrides({"mosaik": 0.5})


# the plan table's baseline is Ultralytics' own value, read from its default.yaml, except where the untuned baseline
# of the tutorials differs from it (with the reason)
TUTORIAL_BASELINE = {"cache": "the untuned baseline is the tutorials' disk cache; Ultralytics' own default is none"}


def test_the_baselines_are_ultralytics_own_defaults():
    from speedtrain import ultra_args

    defaults = ultra_args.defaults()
    assert defaults["imgsz"] == knobs.ULTRALYTICS_IMGSZ
    for k in KNOBS:
        if k.ultralytics and k.baseline is not None and k.name not in TUTORIAL_BASELINE:
            assert k.baseline == defaults[k.ultralytics], k.name
    for row in knobs.PLANNED_ROWS:
        assert row.baseline == defaults[row.name], row.name


def test_the_plans_one_value_defaults_are_declared_once_and_said_in_the_help():
    for name, value in knobs.PLANNED.items():
        assert f"Default: {value}" in knobs.BY_NAME[name].help, name
    declared = (knobs.PLANNED["imgsz"], knobs.PLANNED["epochs"], knobs.PLANNED["patience"])
    assert declared == (planner.MAIN_IMGSZ, planner.MAIN_EPOCHS, planner.PATIENCE)
    assert _plan().stages[0].imgsz == knobs.PLANNED["imgsz"]


@pytest.mark.parametrize(
    ("name", "value", "cli", "api"),
    [
        ("imgsz", 416, "--img-size 416", "imgsz=416"),
        ("finetune", "yes", "--finetune yes", "finetune='yes'"),
        ("finetune_imgsz", 640, "--finetune-img-size 640", "finetune_imgsz=640"),
        ("rect", None, "--rect", "rect=True"),
        ("allow_download", None, "--allow-download", "allow_download=True"),
        ("resume", "runs/x", "--resume runs/x", "speedtrain.resume('runs/x')"),
        ("resume", None, "--resume", "speedtrain.resume()"),
        ("dataset", None, "--dataset", "the dataset argument"),
        ("time", None, "--time", "time"),
    ],
)
def test_a_knob_is_named_as_the_face_asking_names_it(name, value, cli, api):
    from speedtrain.knobs import VOICE, said

    args = () if value is None else (value,)
    assert said(name, *args) == cli  # the command line, a rank, a module called directly
    token = VOICE.set("api")
    try:
        assert said(name, *args) == api
    finally:
        VOICE.reset(token)


def test_a_hint_names_the_keyword_in_python_and_the_flag_on_the_command_line(tmp_path, make_dataset):
    from typer.testing import CliRunner

    import speedtrain
    from speedtrain.cli import app
    from speedtrain.errors import UsageError

    root = make_dataset(2, 1)
    with pytest.raises(UsageError, match=r"^pipeline='fast' trains on square mosaic batches; .* with rect=True$"):
        speedtrain.plan(root, pipeline="fast", rect=True)
    result = CliRunner().invoke(app, ["plan", "--dataset", str(root), "--pipeline", "fast", "--rect"])
    assert result.exit_code == 2
    assert "--pipeline fast trains on square mosaic batches; it cannot be combined with --rect" in result.stderr
