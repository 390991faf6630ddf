"""The records that cross modules: what a stage and a run measured, progress events, tune and resize results,
the dataset summary a report keeps, and a planned run. Each is produced in one module and read in others (the
report, the renderer, the CLI, the comparison), so they live here, below all of them: a module never imports
another only for its types. Pure data with their JSON forms; no I/O, no torch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from speedtrain.dataset import DatasetStats, Problem
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Cache, Overrides, TrainPlan
from speedtrain.parallel import Progress

Log = Callable[[str], None]  # where progress lines go


FINISHED = ("completed", "early-stopped", "skipped")


@dataclass(frozen=True, slots=True)
class OomFallback:
    epoch: int  # the epoch (1-based) that ran out of memory; training went on from the checkpoint before it
    from_batch: int
    to_batch: int
    at: str
    error: str
    kind: str = "device"  # "device": the batch stepped down; "host": RAM ran out, `change` says what was given up
    change: str = ""


ResultStatus = Literal["completed", "early-stopped", "skipped", "interrupted"]


@dataclass(frozen=True, slots=True)
class RankFigures:
    """What one rank of a multi-process stage measured itself (rank 0 gathers them for the report)."""

    rank: int
    node: str  # the host name
    device: str  # "cuda:1", "cpu"
    images_per_s: float | None  # this rank's shard of the training images / its training-pass seconds
    gpu_util_mean: float | None = None
    gpu_mem_peak_gb: float | None = None
    images: int = 0  # training images per epoch in this rank's shard (padded like DistributedSampler)
    batches: int = 0  # batches per epoch: the same on every rank, or one would wait for the others forever


@dataclass(frozen=True, slots=True)
class StageResult:
    name: str
    status: ResultStatus
    imgsz: int
    batch: int  # the batch size the stage finished with
    epochs_planned: int
    epochs_done: int
    epoch_times_s: tuple[float, ...] = ()  # whole epoch: train, validation, checkpoint
    train_times_s: tuple[float, ...] = ()  # the training pass alone
    images_per_epoch: int = 0
    iterations_per_epoch: int = 0
    images_per_s: float | None = None  # training images / training-pass seconds, all epochs
    images_per_s_steady: float | None = None  # the same without the first epoch (start-up, warm caches)
    gpu_util_mean: float | None = None
    gpu_mem_peak_gb: float | None = None
    cpu_util_mean: float | None = None
    ram_used_peak_gb: float | None = None
    threads: int | None = None  # torch intra-op threads the training process ran with (read, not planned)
    fast_store: str | None = None  # --pipeline fast: "ram" (read into RAM) or "memmap" (read from disk as needed)
    oom_fallbacks: tuple[OomFallback, ...] = ()
    best_metrics: tuple[tuple[str, float], ...] = ()
    weights: str | None = None
    last_weights: str | None = None
    save_dir: str | None = None
    wall_time_s: float = 0.0
    note: str = ""
    epoch_end_s: tuple[float, ...] = ()  # seconds from the stage's start (setup included) to each epoch's end
    latency_ms: tuple[tuple[int, float], ...] = ()  # (image size, ms): the trained model, batch 1, median
    stopped_by: str | None = None  # the signal that interrupted the stage ("SIGINT", "SIGTERM")
    ranks: tuple[RankFigures, ...] = ()  # one per rank when several processes trained the stage together
    # per epoch, from Ultralytics' results.csv: the training-time validation's mAP50-95 and the training loss
    # (box + cls + dfl, the mean over the epoch's batches)
    epoch_map50_95: tuple[float, ...] = ()
    epoch_loss: tuple[float, ...] = ()
    epoch_validated: tuple[int, ...] = ()  # the 1-based epochs of epoch_map50_95 when not every epoch was validated
    val_every: int = 1  # the validation cadence the stage ended with (--val-every; auto's measured choice)
    val_time_s: float = 0.0  # seconds spent validating after epochs (measured; 0 when every epoch, not timed)
    val_saved_s: float = 0.0  # validation time the skipped epochs did not spend (estimate from val_time_s)
    # an epoch's training pass, estimated from the stage's first batches (before its first epoch ended), and how
    # many batches it rests on: the report puts it beside the measured mean
    estimated_epoch_s: float | None = None
    estimated_from_batches: int = 0
    scores: tuple[tuple[int, float], ...] = ()  # (image size, mAP50-95) of the final weights, measured after training
    # a budgeted stage (--time), per epoch: image size, start and end on its training clock (seconds), the learning
    # rate's factor of its peak at both, whether it was validated and trained with mosaic
    phase_log: tuple[dict[str, Any], ...] = ()

    def metric(self, key: str) -> float | None:
        return dict(self.best_metrics).get(key)

    def score_at(self, imgsz: int) -> float | None:
        """The final weights' mAP50-95 validated at `imgsz`: measured after the stage, or Ultralytics' own final
        validation at the stage's size."""
        found = dict(self.scores).get(imgsz)
        return found if found is not None or imgsz != self.imgsz else self.metric("mAP50-95")


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: str
    model_source: str
    model_note: str
    stages: tuple[StageResult, ...]
    started_at: str
    wall_time_s: float
    interrupted: bool = False
    stopped_by: str | None = None  # "SIGINT" or "SIGTERM" when interrupted


@dataclass(frozen=True, slots=True)
class StageProgress:
    """Where a stage's training is, for a progress display: sent after every batch and every validation."""

    stage: str
    epoch: int  # the running epoch, 0-based
    epochs: int
    fraction: float  # of the running epoch done
    images_per_s: float | None  # the last finished epoch's training pass
    map50_95: float | None  # the last validation's
    epoch_done: bool = False  # True once the epoch is trained, validated and saved
    batch: int = 0  # batches of the running epoch done so far
    batches: int = 0  # batches in an epoch


OnProgress = Callable[[StageProgress], None]


@dataclass(frozen=True, slots=True)
class StepProbe:
    batch: int
    images_per_s: float | None  # None: out of memory, or the budget ran out before it was timed
    peak_mem_gb: float | None
    oom: bool = False
    rel_err: float = 0.0  # standard error of the rate, relative: spread of the timed steps / sqrt(steps)


@dataclass(frozen=True, slots=True)
class LoaderProbe:
    workers: int
    cache: Cache
    images_per_s: float
    peak_ram_gb: float
    rel_err: float = 0.0  # standard error of the rate, relative: spread of the timed batches / sqrt(batches)


@dataclass(frozen=True, slots=True)
class TuneResult:
    fingerprint: str
    device: str
    model: str
    imgsz: int
    steps: tuple[StepProbe, ...]
    loaders: tuple[LoaderProbe, ...]
    batch: int
    workers: int
    cache: Cache
    predicted_images_per_s: float
    bound: Literal["data", "compute", "unknown"]  # which side sets the pace; "unknown" when nothing was timed
    bound_factor: float  # how many times faster the other side could go
    diagnosis: tuple[str, ...]
    achieved_images_per_s: float | None = None  # the confirming short run
    plan_batch: int = 0  # the plan's configuration, always among the candidates
    plan_workers: int = 0
    plan_cache: Cache = False
    plan_predicted_images_per_s: float | None = None
    plan_achieved_images_per_s: float | None = None  # the same short run with the plan's configuration
    kept_plan: bool = False  # True when the plan's configuration was kept (nothing measurably faster)
    fast_achieved_images_per_s: float | None = None  # the same short run with --pipeline fast (data-bound GPU runs)
    elapsed_s: float = 0.0
    budget_s: float = 0.0
    created_at: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [asdict(s) for s in self.steps]
        data["loaders"] = [asdict(x) for x in self.loaders]
        data["diagnosis"] = list(self.diagnosis)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneResult:
        data = dict(data)
        data["steps"] = tuple(StepProbe(**s) for s in data["steps"])
        data["loaders"] = tuple(LoaderProbe(**x) for x in data["loaders"])
        data["diagnosis"] = tuple(data["diagnosis"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class ResizeSummary:
    out_dir: str
    yaml_path: str | None  # None for --in-place, where the dataset's own yaml stays as it is
    size: int
    images: int
    resized: int
    copied: int  # already no larger than size: copied unchanged
    unchanged: int  # done by an earlier run and not changed since: skipped
    failed: tuple[Problem, ...]
    labels_copied: int
    removed: int  # outputs whose source image is gone
    bytes_before: int
    bytes_after: int
    seconds: float
    workers: int
    qualities: tuple[tuple[int, int], ...] = ()  # (JPEG/WebP quality, images written at it), lowest first

    @property
    def processed(self) -> int:
        return self.resized + self.copied

    @property
    def images_per_s(self) -> float | None:
        return round(self.processed / self.seconds, 1) if self.processed and self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failed"] = [p.line() for p in self.failed]
        data["images_per_s"] = self.images_per_s
        data["qualities"] = {str(q): n for q, n in self.qualities}
        return data


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """The dataset a run trained on, as the report keeps it (a scan's figures, not its file lists)."""

    yaml_path: str | None
    root: str
    train_images: int
    val_images: int
    label_files: int
    background_images: int
    classes: int
    median_long_side: int
    max_long_side: int
    sampled: bool
    sample_size: int
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()
    fingerprint: str = ""  # the scan's hash of every file's path, size and mtime ("" in reports before it)

    @property
    def name(self) -> str:
        """What a user calls the dataset: its folder's name (the yaml's, for a yaml named after it)."""
        stem = Path(self.yaml_path).stem if self.yaml_path else ""
        return stem if stem and stem not in ("data", "dataset") else Path(self.root).name or self.root

    @classmethod
    def of(cls, stats: DatasetStats) -> DatasetSummary:
        sizes = stats.image_sizes
        return cls(
            yaml_path=stats.yaml_path,
            root=stats.root,
            train_images=stats.train_images,
            val_images=stats.val_images,
            label_files=stats.label_files,
            background_images=stats.background_images,
            classes=stats.classes,
            median_long_side=sizes.median_long_side(),
            max_long_side=sizes.max_long_side(),
            sampled=sizes.sampled,
            sample_size=len(sizes.dims),
            problems=stats.problems,
            notes=tuple(stats.notes),
            fingerprint=stats.fingerprint,
        )

    def to_dict(self) -> dict[str, Any]:
        """The report's "dataset" block (also what `speedtrain check --json` prints)."""
        return _dataset_dict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DatasetSummary:
        return _dataset(raw)


@dataclass(frozen=True, slots=True)
class Preparation:
    """The pre-resized copy a run trained on: what writing it cost and what loading it saves."""

    decision: str
    summary: ResizeSummary
    load_ms_original: float | None
    load_ms_prepared: float | None
    load_sample: int
    original_dataset: DatasetSummary
    ram_cache: bool = False  # the run caches the copy in RAM: each image is loaded once a run, not once an epoch

    @property
    def saving_s_per_epoch(self) -> float | None:
        """Loading saved by the copy each time every training image is loaded: once an epoch, or once a run when the
        RAM cache loads each image once (then it is the saving per run)."""
        before, after = self.load_ms_original, self.load_ms_prepared
        return round((before - after) * self.original_dataset.train_images / 1000, 2) if before and after else None


@dataclass(frozen=True, slots=True)
class Planned:
    """What a run is planned from: the machine, the dataset, the user's overrides, and the plan."""

    hw: HardwareSnapshot
    stats: DatasetStats
    overrides: Overrides
    plan: TrainPlan
    prepared: Preparation | None = None  # once the dataset was resized
    tuned: TuneResult | None = None  # the tune result applied to the plan (train --autotune)


def _dataset_dict(d: DatasetSummary) -> dict[str, Any]:
    return {
        "yaml_path": d.yaml_path,
        "root": d.root,
        "train_images": d.train_images,
        "val_images": d.val_images,
        "label_files": d.label_files,
        "background_images": d.background_images,
        "classes": d.classes,
        "image_size": {
            "median_long_side": d.median_long_side,
            "max_long_side": d.max_long_side,
            "sampled": d.sampled,
            "sample_size": d.sample_size,
        },
        "problems": [asdict(p) for p in d.problems],
        "notes": list(d.notes),
        "fingerprint": d.fingerprint,
    }


def _dataset(raw: dict[str, Any]) -> DatasetSummary:
    size = raw.get("image_size", {})
    return DatasetSummary(
        yaml_path=raw.get("yaml_path"),
        root=raw["root"],
        train_images=int(raw["train_images"]),
        val_images=int(raw["val_images"]),
        label_files=int(raw.get("label_files", 0)),
        background_images=int(raw.get("background_images", 0)),
        classes=int(raw.get("classes", 0)),
        median_long_side=int(size.get("median_long_side", 0)),
        max_long_side=int(size.get("max_long_side", 0)),
        sampled=bool(size.get("sampled", False)),
        sample_size=int(size.get("sample_size", 0)),
        problems=tuple(Problem(**p) for p in raw.get("problems", [])),
        notes=tuple(raw.get("notes", [])),
        fingerprint=str(raw.get("fingerprint", "")),
    )


OnEvent = Callable[[str, Any], None]
ProgressFactory = Callable[[str], contextlib.AbstractContextManager[Progress | None]]


def silent(_line: str) -> None:
    """Progress lines that go nowhere."""


@contextlib.contextmanager
def _no_progress(_label: str) -> Iterator[Progress | None]:
    yield None


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the caller of a run hears and answers, passed down as one value: speedtrain's progress lines (`log`),
    each stage's progress after every batch (`on_update`), the `finetune="ask"` question (`ask`: True, False, or
    None to let auto decide), the run's milestones (`on_event(kind, value)`: "prepared", "tuned", "planned") and
    the resize's progress (`progress(label)`: a context yielding a (done, total) callback, or None)."""

    log: Log = silent
    on_update: OnProgress | None = None
    ask: Callable[[StageResult], bool | None] | None = None
    on_event: OnEvent | None = None
    progress: ProgressFactory | None = None

    def event(self, kind: str, value: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, value)

    def progress_of(self, label: str) -> contextlib.AbstractContextManager[Progress | None]:
        return (self.progress or _no_progress)(label)

    def silent(self) -> Hooks:
        """The same hooks without progress lines (a rank other than 0: rank 0 speaks for the run)."""
        return replace(self, log=silent)
