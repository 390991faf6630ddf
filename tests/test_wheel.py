"""The package as a user installs it: a wheel built from this checkout, installed in a fresh environment outside
it, trains on its packaged sample and answers `python -m speedtrain --help`. The environment reuses this one's
installed dependencies (torch, Ultralytics: gigabytes) through a plain path entry, which leaves this checkout's
editable install out, so `import speedtrain` can only find the wheel's copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment, outside the checkout, with speedtrain's wheel installed; its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp / "dist").glob("speedtrain-*.whl")
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies from this environment, as a plain path (its .pth files, the editable install among them,
    # are not read from there)
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    return python


def _run(python: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_the_wheel_installs_its_package_data_and_entry_points_outside_the_checkout(installed, tmp_path):
    where = _run(
        installed, "-c", "import speedtrain, pathlib; print(pathlib.Path(speedtrain.__file__).parent)", cwd=tmp_path
    )
    package = Path(where.stdout.strip())
    assert REPO not in package.parents, package  # the wheel's copy, not this checkout
    assert (package / "sample" / "data.yaml").is_file()
    assert len(list((package / "sample" / "images").rglob("*.jpg"))) == 32
    help_text = _run(installed, "-m", "speedtrain", "--help", cwd=tmp_path)
    assert help_text.returncode == 0
    assert "train" in help_text.stdout
    script = installed.parent / "speedtrain"
    assert script.is_file()  # the console script
    probe = subprocess.run(
        [str(script), "probe", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        timeout=120,
    )
    assert json.loads(probe.stdout)["versions"]["speedtrain"]


@pytest.mark.slow
def test_the_installed_wheel_trains_on_its_packaged_sample(installed, tmp_path):
    out = _run(installed, "-m", "speedtrain", "train", "--project", str(tmp_path / "runs"), "plots=False", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["run"]["status"] == "finished"
    assert "site-packages" in doc["dataset"]["root"] or REPO not in Path(doc["dataset"]["root"]).parents
