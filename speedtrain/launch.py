"""Start this node's ranks with PyTorch's own launcher, restart them together after an out-of-memory, and say
what ended a run that failed.

The launcher is torch.distributed.launcher's `elastic_launch`, the code behind `torchrun`: it sets the torchrun
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for each rank, starts `python -m speedtrain.rank
RUN_DIR` in its own session (so a terminal's Ctrl-C reaches the launcher, which passes it to every rank once), and
when one rank fails, stops the others and raises ChildFailedError naming it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speedtrain import oom
from speedtrain.checkpoints import resume_point
from speedtrain.errors import TrainingError
from speedtrain.knobs import resume_command
from speedtrain.speedreport import SpeedReport

RANK_MODULE = "speedtrain.rank"
# How long the launcher lets the ranks finish the epoch after Ctrl-C or SIGTERM before it kills them (torchrun's own
# default is 30 s, less than an epoch of most real runs). A rank that exits is noticed within MONITOR_S.
SHUTDOWN_S = 3600
OLD_TORCH_GRACE_S = 30  # torch before 2.12: fixed in PContext.close
MONITOR_S = 0.5
MAX_RESTARTS = 16  # out-of-memory restarts; each steps one batch down the plan's chain, which ends sooner


def run(
    run_dir: Path,
    nproc: int,
    *,
    resuming: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> SpeedReport:
    """Train the run started in `run_dir` with `nproc` ranks on this node; its report once they are done.

    A rank that ran out of memory left a record: the ranks start again, one batch smaller, from the last saved
    epoch. Ctrl-C or SIGTERM: the ranks finish and save the epoch, and the report says the run was interrupted.
    Any other failure is a TrainingError naming the rank and the command that goes on.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    log(f"starting {nproc} ranks (torch.distributed, one process each)")
    if (grace := grace_s()) < SHUTDOWN_S:
        log(
            f"this torch gives ranks {grace} s after Ctrl-C or SIGTERM before it kills them (torch 2.12 and "
            "later let speedtrain give them an hour): an epoch not finished by then is trained again on --resume"
        )
    for attempt in range(MAX_RESTARTS + 1):
        config = launch_config(nproc, f"speedtrain-{run_dir.name}-{attempt}")
        args = [*RUN_RANK, str(run_dir), *(["--resume"] if resuming else []), *(["--quiet"] if quiet else [])]
        try:
            elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as exc:
            rep = SpeedReport.from_json(run_dir)
            if rep.run is not None and rep.run.interrupted:
                break  # a signal reached a rank, not this launcher: all ranks stopped after the same saved epoch
            if any(oom.faults(d) for d in _stage_dirs(run_dir)) and attempt < MAX_RESTARTS:
                resuming = True  # the ranks read the record and step down together
                continue
            raise TrainingError(failure_line(exc, run_dir)) from None
        except SignalException:
            pass  # the ranks had the signal too, finished the epoch and saved it: the report says so
        break
    return SpeedReport.from_json(run_dir)


def launch_config(nproc: int, run_id: str) -> Any:
    """torchrun's configuration for `nproc` ranks on this node, each rank's failure fatal to the attempt.

    The grace time after a stop signal (`shutdown_timeout`) is a LaunchConfig field from torch 2.12 on; before, it
    is a fixed 30 s, and passing it would be a TypeError."""
    from torch.distributed.launcher.api import LaunchConfig

    grace: dict[str, Any] = {"shutdown_timeout": SHUTDOWN_S} if _has_grace_field(LaunchConfig) else {}
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=MONITOR_S,
        **grace,
    )


def grace_s() -> int:
    """Seconds the ranks get to finish their epoch after Ctrl-C or SIGTERM with this torch."""
    from torch.distributed.launcher.api import LaunchConfig

    return SHUTDOWN_S if _has_grace_field(LaunchConfig) else OLD_TORCH_GRACE_S


def _has_grace_field(config_class: type) -> bool:
    return any(f.name == "shutdown_timeout" for f in dataclasses.fields(config_class))


def _stage_dirs(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.is_dir()]


# The ranks import speedtrain from where it is installed, never from the working directory: `python -m` puts the
# working directory first on sys.path, and a folder there named speedtrain/ would shadow the package in every rank.
# Python 3.11's -P leaves it out; on 3.10 a bootstrap drops it before running the rank module.
RUN_RANK: tuple[str, ...] = (
    ("-P", "-m", RANK_MODULE)
    if sys.version_info >= (3, 11)
    else (
        "-c",
        "import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)",
        RANK_MODULE,
    )
)


def failure_line(exc: Any, run_dir: Path) -> str:
    """One line for a failed group: the first rank that failed, how, what was kept, and the command that goes on."""

    rank, failure = exc.get_first_failure()
    how = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    why = "was killed" if failure.exitcode < 0 else "failed"
    saved = [d.name for d in _stage_dirs(run_dir) if resume_point(d) is not None]
    kept = (
        f"the saved epochs of {', '.join(saved)} are kept: go on with {resume_command(run_dir)}"
        if saved
        else f"no epoch was saved yet; its log: {run_dir / 'ultralytics.log'}"
    )
    return f"rank {rank} {why} ({how}, pid {failure.pid}); the other ranks were stopped; {kept}"
