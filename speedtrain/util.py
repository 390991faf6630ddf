"""Small helpers every module needs the same way: atomic writes, bounded reads of a user's files, the nearest
existing folder, an exception's first line, a UTC timestamp. Defined once here."""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speedtrain.errors import DiskSpaceError, UsageError
from speedtrain.knobs import said

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space left, or over the quota


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


@contextlib.contextmanager
def disk_full_is_one_line(path: Path, kept: str) -> Iterator[None]:
    """A write that finds the disk full becomes one line naming the file and what is kept (DiskSpaceError, exit 6),
    never a traceback from deep inside the write."""

    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskSpaceError(f"{path}: the disk is full ({exc.strerror}); {kept}") from None


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


class NotAFile(OSError):
    """A path where a regular file was expected holds something else (a FIFO, a device, a socket, a folder)."""


class TooLarge(OSError):
    """A user's file holds more bytes than the limit for its kind."""


def file_kind(mode: int) -> str:
    """What a stat mode is, in words."""
    for test, word in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def is_regular_file(path: str | Path) -> bool:
    """True for a regular file (links followed); False for anything else or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a user's file, which must be a regular file (links followed) of at most `limit` bytes.

    Opened without blocking (a FIFO with no writer would wait forever) and checked on the open descriptor, so a
    FIFO, a device such as /dev/zero, a socket or a folder is refused before a byte is read; the size is what is
    actually read, never stat()'s figure (a device reports 0). Raises NotAFile, TooLarge or another OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(f"{path}: {file_kind(mode)}, not a file")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"{path}: over {limit / 1024**2:g} MB")
    finally:
        os.close(fd)


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or inside it as the filesystem sees it: links resolved both ways, and an existing
    ancestor that is the same directory as `folder` (a bind mount, a second path to it) counts too."""
    real, real_folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real == real_folder or real_folder in real.parents:
        return True
    for candidate in (real, *real.parents):
        try:
            if candidate.exists() and os.path.samefile(candidate, real_folder):
                return True
        except OSError:
            continue
    return False


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
LINE_BREAKS = re.compile(r"[\r\n]+")


class PlainStream:
    """A text stream that drops ANSI colour codes on their way to a file or pipe, and keeps the last line written
    (a progress bar's latest frame, redrawn after a carriage return, included) as `latest`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.latest = ""

    def write(self, text: str) -> int:
        plain = ANSI.sub("", text)
        lines = [line.strip() for line in LINE_BREAKS.split(plain) if line.strip()]
        if lines:
            self.latest = lines[-1]
        return self._stream.write(plain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def plain_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr without colour codes for the block (a log file or a pipe), then restored."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PlainStream(out), PlainStream(err)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


DISK_MARGIN = (1.1, 0.25)  # (factor, GB): what a write is estimated to need, times 1.1, plus 0.25 GB of headroom


def check_free_disk(where: Path, need_gb: float, what: str, remedy: str = "free some space") -> None:
    """Refuse, before anything is written, what cannot fit on the disk holding `where` (the one margin rule)."""

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
        return json.loads(read_bounded(path, JSON_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise error(missing) from None
    except TooLarge:
        raise error(f"{path}: too large for {what} (over {JSON_MAX_BYTES // 1024**2} MB)") from None
    except NotAFile as exc:
        raise error(f"{exc}; expected {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({first_line(exc)})") from None


def spread(n: int, k: int) -> list[int]:
    """min(n, k) indices of range(n), evenly spaced, the first and the last included (only the last for k=1)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [n - 1] if k == 1 else []
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def closest(name: str, known: Iterable[str], limit: int = 3) -> list[str]:
    """The known names closest to a mistyped one: the best match (a similarity of at least 0.6, difflib's own
    default) and any within 0.1 of it, best first; [] when nothing is close."""

    scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in set(known)), reverse=True)
    if not scored or scored[0][0] < 0.6:
        return []
    return [k for ratio, k in scored if ratio >= scored[0][0] - 0.1][:limit]


def duration(seconds: float) -> str:
    """'4m 05s', or '2h 10m' from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def parse_duration(text: str | float | int, name: str) -> float:
    """Seconds from "90s", "20m", "1h", "1h30m" or a plain number of seconds; one clear line naming the option
    `name` (its keyword) as the face asking words it."""

    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    raw = str(text).strip().lower()
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", raw)
    if not raw or not match or not any(match.groups()):
        raise UsageError(f"{said(name, text, quoted=True)}: a duration such as 90s, 20m, 1h or 1h30m")
    hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + secs


def fmt_map(value: float) -> str:
    """An mAP with three decimals, or with as many as it takes not to print a small non-zero value as 0.000."""
    return f"{value:.3f}" if value == 0 or value >= 0.001 else f"{value:.5f}".rstrip("0")  # scores keep 5


@contextlib.contextmanager
def torch_threads_restored(threads: int | None = None) -> Iterator[None]:
    """Leave torch's thread count as it was found (Ultralytics and the plan change it for CPU training);
    with `threads`, set it for the block."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
