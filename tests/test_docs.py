"""The README and the docs stay true: the CLI reference is generated and fresh, every flag and JSON key is
documented, every example command parses, and the words are for users."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import typer.main
from conftest import REPO

from speedtrain import planner, ultra_args
from speedtrain.cli import app

README = (REPO / "README.md").read_text(encoding="utf-8")
GUIDE = (REPO / "SPEED_OPTIMIZATION_GUIDE.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md"))}
DOCS["speed-guide.md"] = GUIDE  # the site's page is the root guide, included
ALL = README + "\n".join(DOCS.values())


def _commands() -> dict:
    return typer.main.get_command(app).commands


def test_the_cli_reference_is_generated_from_the_app_and_fresh():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "cli_docs.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_the_sample_report_picture_check_sees_a_changed_picture(tmp_path):
    """The freshness check of the sample report's PNG: the same picture passes, one with a panel redrawn fails."""
    sys.path.insert(0, str(REPO / "tools"))
    from cli_docs import SAMPLE_PNG, same_picture
    from PIL import Image, ImageDraw

    with Image.open(SAMPLE_PNG) as picture:
        copy, changed = tmp_path / "copy.png", tmp_path / "changed.png"
        picture.save(copy)
        w, h = picture.size
        ImageDraw.Draw(picture).rectangle((w // 4, h // 4, w // 3, h // 2), fill="black")
        picture.save(changed)
    assert same_picture(SAMPLE_PNG, copy)
    assert not same_picture(SAMPLE_PNG, changed)


def test_every_command_and_flag_is_documented():
    for name, command in _commands().items():
        assert f"speedtrain {name}" in DOCS["cli.md"], name
        for param in command.params:
            if param.param_type_name == "option":
                longs = [o for o in param.opts + param.secondary_opts if o.startswith("--") and o != "--help"]
                assert any(o in DOCS["cli.md"] for o in longs), f"{name}: {longs}"


def test_the_speed_guide_is_one_file_at_the_root_that_the_site_includes():
    page = (REPO / "docs" / "speed-guide.md").read_text(encoding="utf-8")
    assert re.fullmatch(r'\{%\s*include-markdown "\.\./SPEED_OPTIMIZATION_GUIDE\.md"\s*%\}\s*', page)
    assert "(SPEED_OPTIMIZATION_GUIDE.md)" in README
    for target in re.findall(r"\]\((?!https?://)([^)#]+)", GUIDE):  # links work from the root (GitHub) ...
        assert (REPO / target).exists(), target
    # ... and the plugin rewrites them for the site: docs/compare.md becomes compare.md (mkdocs --strict checks it)
    assert "include-markdown" in (REPO / "mkdocs.yml").read_text(encoding="utf-8")


def test_every_planned_knob_has_a_row_in_the_plan_page():
    """Every row of the printed plan (from the declarations in speedtrain/knobs.py) has its rule in plan.md."""
    from speedtrain import knobs

    for knob in [name for name, *_ in knobs.table_rows()] + ["fine-tune"]:
        assert f"| {knob} |" in DOCS["plan.md"], knob


def _example_commands() -> list[str]:
    """Every `speedtrain ...` line in a bash or console block of the README and the docs."""
    found = []
    for text in (README, *DOCS.values()):
        for block in re.findall(r"```(?:bash|console)\n(.*?)```", text, re.S):  # in a tab too (indented)
            for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
                line = line.split("  #")[0].strip().removeprefix("$ ")
                if line.startswith("speedtrain ") and "[" not in line and "..." not in line:
                    found.append(line)
    return found


@pytest.mark.parametrize("line", _example_commands())
def test_every_example_command_parses(line):
    """Parsed as speedtrain parses it (options, choices, key=value names and types), without running it."""
    from speedtrain.cli import _PassThrough

    args = shlex.split(line)[1:]
    command = _commands()[args[0]]
    ctx = command.make_context(args[0], args[1:])
    if isinstance(command, _PassThrough):
        planner.parse_extra_args(list(ctx.args), ultra_args.defaults())


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 160
    for page in re.findall(r"\(docs/([\w-]+\.md)", README):
        assert page in DOCS, page


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
        "epoch_map50_95",
        "epoch_loss",
        "scores",
    ):
        assert f'"{key}"' in DOCS["json.md"], key


def test_every_command_help_ends_with_an_example():
    for name, command in _commands().items():
        assert "Example: speedtrain " in (command.help or ""), name


HISTORY = re.compile(
    r"\b(seed project|the seed|lent|this work|workplace|original workflow|new in this version|now also)\b",
    re.I,
)
# what a user reads: every file the repository tracks, tests and their data aside (a test may quote a word to ban it)


def _user_facing() -> list[str]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    binary = (".png", ".jpg", ".jpeg", ".pt", ".npy", ".ico")
    return [f for f in tracked if not f.startswith(("tests/", "speedtrain/sample/")) and not f.endswith(binary)]


def test_words_are_for_users():
    """Nothing a user reads speaks of how the project was made or of what it was before (in the code, "session" is
    a process session)."""
    docs = {"README.md": README, **{f"docs/{k}": v for k, v in DOCS.items()}}
    files = {name: REPO / name for name in _user_facing()}
    assert {"README.md", "SPEED_OPTIMIZATION_GUIDE.md", ".ci/run", "mkdocs.yml", "speedtrain/cli.py"} <= set(files)
    texts = {name: p.read_text(encoding="utf-8") for name, p in files.items() if p.is_file()}
    for name, text in {**texts, **docs}.items():
        hits = [m.group(0) for m in HISTORY.finditer(text)]
        if name in docs:
            hits += re.findall(r"\bsessions?\b", text, re.I)
        assert not hits, f"{name}: {hits}"
