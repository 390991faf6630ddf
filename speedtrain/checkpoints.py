"""A stage's folder as Ultralytics leaves it: the checkpoint to go on from, the epoch it holds, and the figures
results.csv keeps (epoch times, the mAP and loss curves, the best epoch). torch is imported inside functions."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from speedtrain.errors import TrainingError
from speedtrain.knobs import Stage, said
from speedtrain.records import StageResult

RESUME_NAME = "resume.pt"  # an atomic copy of each saved last.pt: Ultralytics writes last.pt in place and strips it
PHASES_STATE = "phases.json"  # a budgeted stage's deadline state, written just before each resume.pt


def deadline_reached(stage_dir: Path) -> bool:
    """Whether a budgeted stage saved its last epoch at its deadline (its phases' state says it stopped there)."""
    try:
        return bool(json.loads((stage_dir / PHASES_STATE).read_text(encoding="utf-8")).get("stopped"))
    except (OSError, ValueError, AttributeError):
        return False


def going_on_from(checkpoint: Path | None) -> tuple[int, str]:
    """The 1-based epoch that was running (the one after `checkpoint`, the stage's resume point), and where training
    goes on from."""
    epoch = (checkpoint_epoch(checkpoint) + 1 if checkpoint else 0) + 1
    return epoch, f"from the checkpoint after epoch {epoch - 1}" if checkpoint else "from the start"


def finished_before(
    stage: Stage, stage_dir: Path, checkpoint: Path | None, previous: StageResult | None
) -> StageResult | None:
    """A stage being resumed that had already trained every epoch (a run killed or stopped after its last epoch,
    during the final validation or the report): its result from the files, so that nothing is trained again and
    best.pt is never overwritten. None when there is still training to do; a TrainingError when epochs were saved
    but no checkpoint to go on from is intact (training again from the start would overwrite them)."""
    rows = csv_rows(stage_dir / "results.csv")
    saved = checkpoint_epoch(checkpoint) + 1 if checkpoint is not None else 0
    best = stage_dir / "weights" / "best.pt"
    # with Ultralytics' time=, the epochs it fitted to the budget (in the checkpoint's arguments) are the stage's
    target = fitted_epochs(checkpoint) or stage.epochs if checkpoint is not None and _timed(stage) else stage.epochs
    done = max(saved, len(rows))
    trained = deadline_reached(stage_dir) if stage.schedule else done >= target
    if not trained:
        if checkpoint is None and rows:
            intact = f"{best} is intact" if loads(best) else "best.pt is damaged too"
            raise TrainingError(
                f"{stage.name}: {len(rows)} epochs were saved, but weights/{RESUME_NAME} and weights/last.pt cannot "
                f"be read (damaged), so training cannot go on from them; {intact}: train a new run from it "
                f"({said('model', best)}) rather than over these epochs"
            )
        return None
    if not loads(best):
        return None  # nothing trustworthy to keep: Ultralytics' own resume says what is wrong
    epoch_times = epoch_times_from_csv(stage_dir / "results.csv")
    maps, losses, validated = epoch_curves(stage_dir / "results.csv")
    metrics = best_row_metrics(rows)
    return StageResult(
        name=stage.name,
        status="completed",
        imgsz=stage.imgsz,
        batch=previous.batch if previous else stage.batch,
        epochs_planned=stage.epochs,
        epochs_done=done,
        epoch_times_s=epoch_times,
        train_times_s=previous.train_times_s if previous else (),
        best_metrics=metrics,
        weights=str(best),
        last_weights=str(stage_dir / "weights" / "last.pt") if (stage_dir / "weights" / "last.pt").is_file() else None,
        save_dir=str(stage_dir),
        wall_time_s=previous.wall_time_s if previous else round(sum(epoch_times), 2),
        epoch_map50_95=maps,
        epoch_loss=losses,
        epoch_validated=validated_epochs(validated),
        images_per_epoch=previous.images_per_epoch if previous else 0,
        oom_fallbacks=previous.oom_fallbacks if previous else (),
        note=("had trained to its deadline" if stage.schedule else f"had trained all {done} epochs")
        + " before it stopped; kept as it was (best.pt, results.csv)",
    )


def _timed(stage: Stage) -> bool:
    return "time" in dict(stage.extra)


def fitted_epochs(checkpoint: Path | None) -> int:
    """The epochs a checkpoint's run was set to train (Ultralytics' time= refits them after every epoch and saves
    them in the checkpoint's train_args); 0 when unknown."""
    if checkpoint is None:
        return 0
    import torch

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        return int((ckpt.get("train_args") or {}).get("epochs") or 0)
    except Exception:  # a truncated or foreign file: unknown
        return 0


def loads(weights: Path) -> bool:
    """Whether a weights file is a readable PyTorch checkpoint holding a model."""
    if not weights.is_file():
        return False
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception:  # truncated, foreign: not weights to trust
        return False
    return isinstance(ckpt, dict) and (ckpt.get("model") is not None or ckpt.get("ema") is not None)


def best_row_metrics(rows: list[dict[str, str]]) -> tuple[tuple[str, float], ...]:
    """The metrics of results.csv's best epoch by Ultralytics' fitness (mAP50-95 alone: utils/metrics.py, 8.4.190)."""
    best: tuple[float, dict[str, float]] | None = None
    for row in rows:
        try:
            m = {
                k.removeprefix("metrics/").removesuffix("(B)"): float(v)
                for k, v in row.items()
                if k.startswith("metrics/")
            }
        except ValueError:
            continue
        fit = m.get("mAP50-95", 0.0)
        if math.isfinite(fit) and (best is None or fit > best[0]):
            best = (fit, m)
    return tuple((k, round(v, 5)) for k, v in best[1].items()) if best else ()


def resume_point(stage_dir: Path) -> Path | None:
    """The checkpoint to go on from: resume.pt (always whole) if present, else an unstripped last.pt."""
    for candidate in (stage_dir / "weights" / RESUME_NAME, stage_dir / "weights" / "last.pt"):
        if candidate.is_file() and checkpoint_epoch(candidate) >= 0:
            return candidate
    return None


def checkpoint_epoch(path: Path) -> int:
    """The 0-based epoch a checkpoint was saved after; -1 for a finished (stripped) or unreadable one."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a truncated or foreign file is simply not a resume point
        return -1
    return int(ckpt.get("epoch", -1)) if isinstance(ckpt, dict) and ckpt.get("optimizer") is not None else -1


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of Ultralytics' results.csv (one per epoch, keys stripped); [] when it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def epoch_times_from_csv(path: Path) -> tuple[float, ...]:
    """Per-epoch seconds from the cumulative 'time' column Ultralytics writes to results.csv."""
    cumulative = [float(r["time"]) for r in csv_rows(path) if r.get("time")]
    return tuple(round(b - a, 3) for a, b in zip([0.0, *cumulative], cumulative, strict=False))


LOSS_COLUMNS = ("train/box_loss", "train/cls_loss", "train/dfl_loss")


def epoch_curves(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
    """Per epoch from results.csv: the training-time validation's mAP50-95, the training loss (box + cls + dfl,
    Ultralytics' weights already applied) and the 1-based epoch; epochs whose figures are missing or not numbers
    (not validated: --val-every) are left out of all three."""
    maps, losses, epochs = [], [], []
    for n, row in enumerate(csv_rows(path), start=1):
        try:
            score = float(row["metrics/mAP50-95(B)"])
            loss = sum(float(row[c]) for c in LOSS_COLUMNS if row.get(c))
            epoch = int(float(row.get("epoch") or n))
        except (KeyError, ValueError):
            continue
        if math.isfinite(score) and math.isfinite(loss):
            maps.append(round(score, 5))
            losses.append(round(loss, 4))
            epochs.append(epoch)
    return tuple(maps), tuple(losses), tuple(epochs)


def validated_epochs(epochs: tuple[int, ...]) -> tuple[int, ...]:
    """epoch_validated as a StageResult keeps it: empty when the scores are epochs 1, 2, 3, ... (every epoch)."""
    return () if epochs == tuple(range(1, len(epochs) + 1)) else epochs
