"""The one-click scripts: Bash end to end on a tiny CPU run; PowerShell parsed statically and step-compared."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tree_hash

BASH = REPO / "quick_train_ultra_fast.sh"
PS1 = REPO / "quick_train_ultra_fast.ps1"


def run_bash(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["VIRTUAL_ENV"] = sys.prefix  # the environment running the tests: the script must use it as it is
    return subprocess.run(
        ["bash", str(BASH), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


@pytest.mark.slow
def test_bash_script_end_to_end(make_dataset, tmp_path):
    root = make_dataset(6, 2)
    before = tree_hash(root)
    runs = tmp_path / "runs"
    flags = ["--img-size", "64", "--epochs", "1", "--finetune", "no", "--project", str(runs), "plots=False"]
    out = run_bash(str(root), *flags, tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for n in range(1, 6):
        assert f"==> [{n}/5]" in out.stdout
    assert f"using the active environment {sys.prefix}" in out.stdout
    report = runs / "train" / "speed_report.json"
    assert report.is_file()
    assert (runs / "train" / "speed_report.png").is_file()
    assert f"report: {runs / 'train'}/speed_report.json" in out.stdout
    assert tree_hash(root) == before


def test_bash_script_stops_at_a_missing_dataset(tmp_path):
    out = run_bash(str(tmp_path / "nope"), tmp_path=tmp_path)
    assert out.returncode == 1
    assert "dataset not found" in out.stderr
    assert "==> [1/5]" not in out.stdout  # stopped before touching any environment


@pytest.mark.slow
def test_bash_script_stops_when_training_fails(make_dataset, tmp_path):
    root = make_dataset(3, 1)
    next((root / "labels" / "train").iterdir()).write_text("99 0.5 0.5 0.1 0.1\n")
    out = run_bash(str(root), "--project", str(tmp_path / "runs"), tmp_path=tmp_path)
    assert out.returncode == 1
    assert "class id 99 outside 0..79" in out.stderr
    assert "training failed (exit 3)" in out.stderr
    assert "==> [5/5]" not in out.stdout


def ps_problems(source: bytes) -> list[tuple[str, tuple[int, int]]]:
    """ERROR and MISSING nodes of the tree-sitter PowerShell parse, with (row, column)."""
    import tree_sitter_powershell
    from tree_sitter import Language, Parser

    tree = Parser(Language(tree_sitter_powershell.language())).parse(source)
    found, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            found.append((node.type, tuple(node.start_point)))
        stack.extend(node.children)
    return found


def test_powershell_script_parses_cleanly():
    assert ps_problems(PS1.read_bytes()) == []


def test_the_parse_check_catches_broken_powershell():
    broken = PS1.read_text().replace("if ($LASTEXITCODE -ne 0) { Fail 'pip install failed (see above)' }", "if (", 1)
    assert ps_problems(broken.encode())


def test_powershell_stops_on_errors_and_checks_every_native_exit_code():
    text = PS1.read_text()
    assert "$ErrorActionPreference = 'Stop'" in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*& \$(Py|Python\.Source)\b", line):
            following = "\n".join(lines[i + 1 : i + 3])
            assert "$LASTEXITCODE" in following, f"no exit-code check after line {i + 1}: {line.strip()}"


def _steps(text: str, pattern: str) -> list[tuple[int, str]]:
    return [(int(n), title) for n, title in re.findall(pattern, text)]


def _commands(text: str, marker: str) -> list[list[str]]:
    """Commands run with the venv's python (lines starting with it, inline `-c` snippets aside): their literal
    words and flags, variables dropped."""
    out = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line.startswith(marker) or line[len(marker) :].startswith("-c"):
            continue
        words = re.split(r"\s+", line[len(marker) :].split("||")[0].split("2>")[0].strip())
        out.append([w.strip("\"'") for w in words if w and not w.lstrip('"').startswith(("$", "@"))])
    return out


def test_both_scripts_take_the_same_steps_with_the_same_flags():
    bash, ps1 = BASH.read_text(), PS1.read_text()
    bash_steps = _steps(bash, r'(?m)^step (\d) "([^"]+)"$')
    ps1_steps = _steps(ps1, r"(?m)^Step (\d) '([^']+)'$")
    assert bash_steps == ps1_steps
    assert len(bash_steps) == 5
    bash_cmds, ps1_cmds = _commands(bash, '"$PY" '), _commands(ps1, "& $Py ")
    assert bash_cmds == ps1_cmds
    assert ["train.py", "--dataset", "--prepare", "auto"] in bash_cmds
    assert ["-m", "speedtrain", "check", "--dataset"] in bash_cmds
