"""Ultralytics' train arguments and their defaults, read from its cfg/default.yaml as a file, without importing it.

Importing Ultralytics imports torch (one to several seconds); a mistyped `key=value` is answered without either.
The file is `ultralytics/cfg/default.yaml` (8.4.190), which Ultralytics itself loads as DEFAULT_CFG_DICT
(utils/__init__.py); tests/test_ultra.py checks that both are the same. Everything else of Ultralytics is
reached through speedtrain.ultra.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from speedtrain.errors import TrainingError, UsageError

# The Ultralytics versions speedtrain works with, tested at both ends in CI (.ci/run): 8.4.172 is the oldest whose
# internals speedtrain/ultra.py reaches (tests/test_ultra.py; read in every 8.4 wheel down to 8.4.0: before 8.4.172
# optimizer=auto chose differently and a run-time dependency was missing), 8.4.190 the newest tested; a new minor
# version may move them. The pin in pyproject.toml says the same.
LOWEST, NEWEST_TESTED, BELOW = "8.4.172", "8.4.190", "8.5"
RANGE = f">={LOWEST},<{BELOW}"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(installed: str | None = None) -> str:
    """The installed Ultralytics version, or one line naming the range speedtrain works with and the version found
    (read from the package's metadata: nothing is imported)."""
    try:
        found = installed or metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        raise TrainingError(f"Ultralytics is not installed here: pip install 'ultralytics{RANGE}'") from None
    if not _version_tuple(LOWEST) <= _version_tuple(found) < _version_tuple(BELOW):
        raise UsageError(
            f"Ultralytics {found} is installed; speedtrain works with ultralytics{RANGE}: pip install "
            f"'ultralytics{RANGE}'"
        )
    return found


def defaults() -> dict[str, Any]:
    """Ultralytics' train arguments and their defaults (a copy: callers may change it); an Ultralytics outside the
    supported range is refused here, before anything reads or trains."""
    check_version()
    return dict(_load())


@functools.cache
def _load() -> dict[str, Any]:
    spec = importlib.util.find_spec("ultralytics")  # finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next(
        (Path(f) / "cfg" / "default.yaml" for f in folders if (Path(f) / "cfg" / "default.yaml").is_file()), None
    )
    if path is None:
        raise TrainingError("Ultralytics is not installed here (pip install -r requirements.txt)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
