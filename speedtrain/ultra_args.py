"""Ultralytics' train arguments and their defaults, read from its cfg/default.yaml as a file, without importing it.

Importing Ultralytics imports torch (one to several seconds); a mistyped `key=value` is answered without either.
The file is `ultralytics/cfg/default.yaml` (8.4.190), which Ultralytics itself loads as DEFAULT_CFG_DICT
(utils/__init__.py); tests/test_ultra.py checks that both are the same. Everything else of Ultralytics is
reached through speedtrain.ultra.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import yaml

from speedtrain.errors import TrainingError


def defaults() -> dict[str, Any]:
    """Ultralytics' train arguments and their defaults (a copy: callers may change it)."""
    return dict(_load())


@functools.cache
def _load() -> dict[str, Any]:
    spec = importlib.util.find_spec("ultralytics")  # finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / "cfg" / "default.yaml" for f in folders if (Path(f) / "cfg" / "default.yaml").is_file()),
                None)  # fmt: skip
    if path is None:
        raise TrainingError("Ultralytics is not installed here (pip install -r requirements.txt)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
