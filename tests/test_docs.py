"""The README stays true: every command and flag documented, and CI runs the README's commands."""

from __future__ import annotations

import re

import typer.main
from conftest import REPO

from speedtrain.cli import app

README = (REPO / "README.md").read_text(encoding="utf-8")


def _commands() -> dict:
    return typer.main.get_command(app).commands


def test_every_command_is_in_the_readme():
    for name in _commands():
        assert f"speedtrain {name}" in README, name


def test_every_flag_is_in_the_readme():
    for name, command in _commands().items():
        for param in command.params:
            if param.param_type_name == "option":
                longs = [o for o in param.opts + param.secondary_opts if o.startswith("--") and o != "--help"]
                assert any(o in README for o in longs), f"{name}: {longs}"


def test_quick_start_has_exactly_two_commands_and_ci_runs_them():
    start = README.index("## Quick start")
    section = README[start : README.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    assert all(len(b.strip().splitlines()) == 1 for b in blocks)
    setup, tests = (b.strip() for b in blocks)
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci
    assert "pip install -r requirements.txt" in setup
    assert tests in ci


def test_json_keys_are_documented():
    for key in (
        "total_vram_gb",
        "free_vram_gb",
        "batch_fallbacks",
        "epoch_times_s",
        "images_per_s",
        "iterations_per_epoch",
        "gpu_util_mean",
        "gpu_mem_peak_gb",
        "oom_fallbacks",
        "best_metrics",
    ):
        assert f'"{key}"' in README, key


def test_every_command_help_ends_with_an_example():
    for name, command in _commands().items():
        assert "Example: speedtrain " in (command.help or ""), name
