"""`python -m speedtrain.rank RUN_DIR [--resume] [--quiet]`: one rank of a run that speedtrain started and launched
(speedtrain.launch). Rank 0 prints the run's progress; every rank exits 0 when the run finished, 130 or 143 when a
signal stopped it after a saved epoch, and the error's exit code otherwise (one line, from the rank that failed).
"""

from __future__ import annotations

import argparse
import signal
import sys

from speedtrain import distributed, render, workflow
from speedtrain.errors import PeerFailed, SpeedtrainError
from speedtrain.records import Hooks, StageProgress
from speedtrain.speedreport import SpeedReport
from speedtrain.util import first_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedtrain.rank")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    world = distributed.world()
    if world is None:
        print("speedtrain.rank: not started by a launcher (no WORLD_SIZE > 1)", file=sys.stderr)
        return 2
    return run(args.run_dir, world, resuming=args.resume, quiet=args.quiet)


def run(run_dir: str, world: distributed.World, *, resuming: bool, quiet: bool) -> int:
    """This rank's part of the run in `run_dir`; the exit code."""
    try:
        plan = SpeedReport.from_json(run_dir).plan
        from speedtrain import ultra  # Ultralytics first, then the group

        ultra.join_group(distributed.rank_device(plan.device))
        progress = epoch_done if world.leader and quiet else None  # --verbose: Ultralytics' own bars instead
        hooks = Hooks(log=say if world.leader else quiet_log, on_update=progress)
        rep, _ = workflow.run_as_rank(run_dir, resuming=resuming, hooks=hooks, quiet=quiet)
    except PeerFailed:
        return 1  # the rank that failed first says why
    except SpeedtrainError as exc:
        print(f"speedtrain: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # a broken collective after a peer died, or a bug: one line, not a traceback per rank
        print(f"speedtrain: rank {world.rank} failed: {first_line(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.leave()
    if rep.run and rep.run.interrupted:
        return 128 + (signal.SIGTERM if rep.run.stopped_by == "SIGTERM" else signal.SIGINT)
    return 0


CONSOLE = sys.stdout  # the launcher's console: training sends Ultralytics' own output (sys.stdout) to its log file


def say(line: str) -> None:
    print(line, file=CONSOLE, flush=True)


def epoch_done(ev: StageProgress) -> None:
    """Rank 0's progress: a line per saved epoch, with the whole group's images/s."""
    if ev.epoch_done:
        say(render.epoch_line(ev))


def quiet_log(_line: str) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
