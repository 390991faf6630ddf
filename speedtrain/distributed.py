"""One process of a torchrun group: the torchrun environment contract, the process group, collective decisions.

torchrun (`python -m torch.distributed.run`), SLURM's `srun torchrun ...`, Kubeflow's PyTorchJob and Ray Train set
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process they start; speedtrain
reads them and is that rank. It starts ranks itself only through PyTorch's own launcher (speedtrain.launch).

torch is imported inside the functions, so that reading the environment costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from speedtrain.util import write_atomic

# How long a collective waits for a rank before the group fails. A rank that dies is noticed by the launcher at
# once, which stops the others; on a CPU (gloo) they also fail at once, on the closed connection. On GPUs, NCCL
# ranks blocked in a collective with a dead peer notice nothing until this timeout (CUDA's intra-node transports
# have no connection to close), so it bounds how long a lost rank can hold a run: 30 minutes, longer than any
# wait of a healthy run (caches are built by every rank at once; the fast store under a lock, minutes at most).
# Ultralytics' own is 3 hours (engine/trainer.py _setup_ddp, 8.4.190). SPEEDTRAIN_COLLECTIVE_TIMEOUT_S sets it.
TIMEOUT = timedelta(seconds=float(os.environ.get("SPEEDTRAIN_COLLECTIVE_TIMEOUT_S", "1800")))


@dataclass(frozen=True, slots=True)
class World:
    """This process's place in the group, from the torchrun environment."""

    rank: int
    local_rank: int
    size: int
    local_size: int
    node_rank: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    @property
    def leader(self) -> bool:
        """Rank 0: owns the run folder, the report and the checkpoints."""
        return self.rank == 0


def world() -> World | None:
    """This process's World when a launcher started it as one of several ranks; None for a single process."""
    size = _int("WORLD_SIZE", 1)
    if size <= 1:
        return None
    local_size = _int("LOCAL_WORLD_SIZE", size)
    rank = _int("RANK", 0)
    return World(rank, _int("LOCAL_RANK", 0), size, local_size, _int("GROUP_RANK", rank // max(1, local_size)))


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else default


def rank_device(device: str) -> Any:
    """This rank's torch device for an Ultralytics device string: the CPU, or the LOCAL_RANK-th GPU of the list
    ("0,1,2,3"; one entry per local rank), or GPU LOCAL_RANK when the list is shorter (torchrun's convention)."""
    import torch

    local = _int("LOCAL_RANK", 0)
    text = device.strip().lower().replace("cuda:", "")
    if text in ("cpu", "mps", "") and not (text == "" and torch.cuda.is_available()):
        return torch.device("cpu")
    ids = [int(p) for p in text.split(",") if p.strip().isdigit()]
    return torch.device("cuda", ids[local] if local < len(ids) else local)


def join(device: Any) -> None:
    """Join the group on `device` (NCCL for a GPU, gloo for the CPU), unless this process has joined already.
    A rank that trains joins through ultra.join_group, which imports Ultralytics first."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # collectives honour TIMEOUT, as in Ultralytics
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    restart = _int("TORCHELASTIC_RESTART_COUNT", 0)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart > 0:
        # torchrun --max-restarts keeps its agent's store across restarts: the keys of the group that failed (its
        # ranks' addresses, its barrier counts) are still there, and a group formed on them connects to dead ports
        # or waits forever (seen with torch 2.14 and gloo). Each attempt gets keys of its own.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=TIMEOUT
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"speedtrain/attempt_{restart}", store),
            rank=_int("RANK", 0),
            world_size=_int("WORLD_SIZE", 1),
            timeout=TIMEOUT,
        )
        return
    dist.init_process_group(backend, timeout=TIMEOUT)


def joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: how the group agrees to stop after the same epoch."""
    import torch
    import torch.distributed as dist

    if not joined():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (a single process: [value])."""
    import torch.distributed as dist

    if not joined():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    import torch.distributed as dist

    if not joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_float(value: float) -> float:
    """Rank 0's number on every rank, as one small tensor: cheap enough to agree on a clock after every batch."""
    import torch
    import torch.distributed as dist

    if not joined():
        return value
    box = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(box, src=0)
    return float(box.item())


def barrier() -> None:
    import torch.distributed as dist

    if joined():
        dist.barrier()


def leave() -> None:
    """Leave the group (Ultralytics never destroys it); a failed peer must not turn this into a hang or an error."""
    import torch.distributed as dist

    if joined():
        with contextlib.suppress(Exception):  # leaving after a peer failed: nothing left to do
            dist.destroy_process_group()


def _collective_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def host() -> str:
    return socket.gethostname()


# torchrun --max-restarts starts every rank again with the same command after a rank failed (an out-of-memory, a
# lost rank): `speedtrain train` must then go on with the run this launch started, not start another. torchrun sets
# TORCHELASTIC_RUN_ID (its --rdzv-id) and TORCHELASTIC_RESTART_COUNT for every rank.
RUNS_DIR = ".launches"


def remember_run(project: Path, run_dir: Path) -> None:
    """Rank 0: note which run folder this launch (torchrun's run id) trains, for its restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id:
        write_atomic(project / RUNS_DIR / _safe(run_id), str(run_dir).encode())


def restarted_run(project: Path) -> Path | None:
    """The run folder this launch started before torchrun restarted it; None on its first start."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id or _int("TORCHELASTIC_RESTART_COUNT", 0) == 0:
        return None
    try:
        run_dir = Path((project / RUNS_DIR / _safe(run_id)).read_text(encoding="utf-8").strip())
    except OSError:
        return None
    return run_dir if (run_dir / "speed_report.json").is_file() else None


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:200] or "run"
