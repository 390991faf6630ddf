"""Small helpers every module needs the same way: atomic writes, the nearest existing folder, an exception's
first line, a UTC timestamp. Defined once here."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def existing_parent(path: Path) -> Path:
    """`path` made absolute, or its nearest ancestor that exists (where free disk space can be measured)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def utc_now() -> str:
    """Now, as an ISO 8601 UTC timestamp to the second (the reports' format)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour and cursor codes


DISK_MARGIN = (1.1, 0.25)  # (factor, GB): what a write is estimated to need, times 1.1, plus 0.25 GB of headroom


def check_free_disk(where: Path, need_gb: float, what: str, remedy: str = "free some space") -> None:
    """Refuse, before anything is written, what cannot fit on the disk holding `where` (the one margin rule)."""
    import shutil

    from speedtrain.errors import DiskSpaceError

    factor, headroom = DISK_MARGIN
    need = need_gb * factor + headroom
    free = shutil.disk_usage(existing_parent(where)).free / 1024**3
    if need > free:
        raise DiskSpaceError(f"{where}: {free:.1f} GB free, {what} needs about {need:.1f} GB; {remedy}")


JSON_MAX_BYTES = 16 * 1024**2  # snapshots are about 1 KB, reports tens of KB: anything this large is not one


def read_json(path: Path, what: str, error: type[Exception], missing: str) -> Any:
    """A JSON file speedtrain wrote (or a person wrote for it), bounded in size: its data, or `error` with one line
    (`missing` when there is no such file)."""
    try:
        if path.stat().st_size > JSON_MAX_BYTES:
            raise error(f"{path}: too large for {what} (over {JSON_MAX_BYTES // 1024**2} MB)")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({first_line(exc)})") from None


def spread(n: int, k: int) -> list[int]:
    """min(n, k) indices of range(n), evenly spaced, the first and the last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def closest(name: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """The known names closest to a mistyped one: the best match (a similarity of at least 0.6, difflib's own
    default) and any within 0.1 of it, best first; [] when nothing is close."""
    import difflib

    scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in set(known)), reverse=True)
    if not scored or scored[0][0] < 0.6:
        return []
    return [k for ratio, k in scored if ratio >= scored[0][0] - 0.1][:limit]
