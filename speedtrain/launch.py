"""Start this node's ranks with PyTorch's own launcher, restart them together after an out-of-memory, and say
what ended a run that failed.

The launcher is torch.distributed.launcher's `elastic_launch`, the code behind `torchrun`: it sets the torchrun
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for each rank, starts `python -m speedtrain.rank
RUN_DIR` in its own session (so a terminal's Ctrl-C reaches the launcher, which passes it to every rank once), and
when one rank fails, stops the others and raises ChildFailedError naming it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speedtrain import oom
from speedtrain.errors import TrainingError
from speedtrain.speedreport import SpeedReport

RANK_MODULE = "speedtrain.rank"
# How long the launcher lets the ranks finish the epoch after Ctrl-C or SIGTERM before it kills them (torchrun's own
# default is 30 s, less than an epoch of most real runs). A rank that exits is noticed within MONITOR_S.
SHUTDOWN_S = 3600
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
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log(f"starting {nproc} ranks (torch.distributed, one process each)")
    for attempt in range(MAX_RESTARTS + 1):
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"speedtrain-{run_dir.name}-{attempt}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=MONITOR_S,
            shutdown_timeout=SHUTDOWN_S,
        )  # fmt: skip
        args = ["-m", RANK_MODULE, str(run_dir), *(["--resume"] if resuming else []), *(["--quiet"] if quiet else [])]
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


def _stage_dirs(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.is_dir()]


def failure_line(exc: Any, run_dir: Path) -> str:
    """One line for a failed group: the first rank that failed, how, and the command that goes on."""
    rank, failure = exc.get_first_failure()
    how = failure.signal_name() if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    why = "was killed" if failure.exitcode < 0 else "failed"
    return (f"rank {rank} {why} ({how}, pid {failure.pid}); the other ranks were stopped; the saved epochs are "
            f"kept: go on with `speedtrain train --resume {run_dir}`")  # fmt: skip
