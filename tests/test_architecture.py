"""The code stays as easy to change as it is: no function too complex to follow (radon's cyclomatic complexity,
D and worse, the `radon cc -n D speedtrain` check), and each record declared once, below the modules that read it.
The layering itself is import-linter's (`lint-imports`, in CI)."""

from __future__ import annotations

import ast
import inspect

from conftest import REPO
from radon.complexity import cc_rank, cc_visit

import speedtrain

PACKAGE = REPO / "speedtrain"
RECORDS = (
    "StageResult",
    "RunResult",
    "OomFallback",
    "RankFigures",
    "StageProgress",
    "TuneResult",
    "ResizeSummary",
    "DatasetSummary",
    "Preparation",
    "Planned",
    "Overrides",
    "Stage",
    "TrainPlan",
)


def test_no_function_is_rated_d_or_worse():
    found = [
        f"{path.name}:{block.lineno} {block.fullname} {cc_rank(block.complexity)} ({block.complexity})"
        for path in sorted(PACKAGE.glob("*.py"))
        for block in cc_visit(path.read_text(encoding="utf-8"))
        if cc_rank(block.complexity) not in "ABC"
    ]
    assert not found, "split these (radon cc -s speedtrain shows the branches):\n" + "\n".join(found)


def test_each_record_is_declared_once_in_records_or_knobs():
    where: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name in RECORDS:
                where.setdefault(node.name, []).append(path.name)
    assert where == {
        name: ["knobs.py" if name in ("Overrides", "Stage", "TrainPlan") else "records.py"] for name in RECORDS
    }


def test_the_runner_does_one_job():
    """The stage loop: Ultralytics' callbacks are ultra.Recorder's, failures recovery.py's, a stage folder's
    checkpoints checkpoints.py's."""
    names = {
        n.name
        for n in ast.parse((PACKAGE / "runner.py").read_text(encoding="utf-8")).body
        if isinstance(n, ast.FunctionDef | ast.ClassDef)
    }
    assert not names & {
        "Recorder",
        "_Recorder",
        "resume_point",
        "checkpoint_epoch",
        "recover",
        "check_model",
        "with_scores",
        "with_latency",
        "graceful_stop",
        "finetune_skip_reason",
    }
    assert len((PACKAGE / "runner.py").read_text(encoding="utf-8").splitlines()) < 500


MOST_PARAMETERS = 11
# Typer commands take one parameter per option; a knob's declaration its fields; compare() its own options beside
# the knobs'
MANY_PARAMETERS = {("cli.py", "*"), ("knobs.py", "knob"), ("api.py", "compare")}


def _parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    return len([n for n in names if n.arg not in ("self", "cls")])


def test_settings_travel_as_one_value_not_long_parameter_lists():
    """Where many settings go together they are one value (runner.StageContext, workflow.TrainRequest,
    comparison.CompareRequest, records.Hooks): no function takes more than MOST_PARAMETERS, and the public
    speedtrain.train (its keywords; the knobs come as **args) no more either."""
    long = [
        f"{path.name}:{node.lineno} {node.name} ({_parameters(node)})"
        for path in sorted(PACKAGE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef)
        and _parameters(node) > MOST_PARAMETERS
        and not {(path.name, "*"), (path.name, node.name)} & MANY_PARAMETERS
    ]
    assert not long, long
    assert len(inspect.signature(speedtrain.train).parameters) <= MOST_PARAMETERS


def test_the_formatter_formats_every_line():
    """ruff format decides the layout everywhere (ruff format --check runs in CI): no line opts out of it."""
    marker = "fmt: " + "skip"
    files = [p for d in ("speedtrain", "tests", "benchmarks", "tools") for p in (REPO / d).rglob("*.py")]
    files += list(REPO.glob("*.py"))
    assert len(files) > 50
    assert [str(p.relative_to(REPO)) for p in files if marker in p.read_text(encoding="utf-8")] == []


# What a function may import for itself: what is slow to import or absent on some machines. Everything else is
# imported at the top of its module, where a reader sees what the module depends on.
DEFERRED = ("torch", "ultralytics", "matplotlib", "speedtrain.ultra", "cv2", "pynvml", "numpy", "fcntl")


def test_functions_import_only_what_is_heavy_or_optional():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    base = node.module
                    names = [f"{base}.{a.name}" if base == "speedtrain" else base for a in node.names]
                else:
                    continue
                found += [f"{path.name}:{node.lineno} {n}" for n in names if not n.startswith(DEFERRED)]
    assert found == [], "import these at the top of the module:\n" + "\n".join(found)


def test_errors_name_options_through_the_face_that_asks():
    """An error names a knob or option with knobs.said (`--img-size 416` on the command line, `imgsz=416` in
    Python), never a flag written into its text: a raised or returned error's literal text holds no speedtrain flag
    (Docker's --shm-size is not speedtrain's). The command line itself (cli.py, rank.py) speaks in flags."""
    from speedtrain import knobs

    ours = {f for k in knobs.KNOBS for f in k.flags} | {
        "--dataset",
        "--resume",
        "--project",
        "--name",
        "--allow-download",
        "--size",
        "--out",
        "--in-place",
        "--arms",
        "--budget",
        "--baseline-budget",
        "--retune",
        "--autotune",
        "--budget-s",
    }
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("cli.py", "rank.py", "keywords.py", "knobs.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            value = node.exc if isinstance(node, ast.Raise) else node.value if isinstance(node, ast.Return) else None
            if not (isinstance(value, ast.Call) and getattr(value.func, "id", "").endswith("Error")):
                continue
            for part in ast.walk(value):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    words = {w.rstrip(":,;)") for w in part.value.split()}
                    found += [f"{path.name}:{node.lineno} {w}" for w in words & ours]
    assert not found, found
