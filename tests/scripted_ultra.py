"""A scripted stand-in for Ultralytics behind speedtrain's one door (`speedtrain.ultra.train`, `validate` and
`latency_ms`), so that the stage loop's every path (the recovery ladder, a signal, resume, the final validation's
out-of-memory) runs in milliseconds and a test asserts the whole sequence.

It behaves like Ultralytics 8.4.190's DetectionTrainer where speedtrain can see it (engine/trainer.py): the same
callback events in the same order with a trainer carrying the attributes they read; results.csv written row by row
(deleted by a fresh start, appended to by a resume); last.pt and best.pt saved after every epoch as dicts with the
same keys (`epoch`, `optimizer`, `ema`, `train_args`, `train_metrics`), stripped by the final validation
(`optimizer` None, `epoch` -1, `ema` moved to `model`); a resume takes the checkpoint's arguments and only the ones
Ultralytics lets change, and refuses a finished checkpoint; a training step raises torch's real OutOfMemoryError
with CUDA's message. There is no model: the scores are the script's.
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from conftest import CUDA_OOM

RESUME_ALLOWED = ("batch", "device", "workers", "cache", "patience", "plots", "val")  # engine/trainer.py check_resume


class Killed(BaseException):  # noqa: N818 -- stands for the process dying: nothing catches it, the files stay
    """kill -9 in the middle of an epoch: raised out of training with the files as they were left."""


@dataclass
class Attempt:
    """One training call as the fake saw it."""

    batch: int
    start_epoch: int  # 0-based
    resume: str | None
    args: dict[str, Any]
    epochs_run: list[int] = field(default_factory=list)  # 0-based epochs whose checkpoint was saved


@dataclass
class Script:
    """What the fake Ultralytics does; what it was asked is recorded in `attempts`, `validations`, `latencies`."""

    images: int = 16  # training images (the loader's length is images / batch)
    oom_above: int | None = None  # a training step runs out of GPU memory when the batch is larger than this ...
    oom_from_epoch: int = 0  # ... from this 0-based epoch on
    val_oom_above: int | None = None  # the final validation (and validate()) run out of memory above this batch
    faults: dict[int, BaseException] = field(default_factory=dict)  # raised once, in the 0-based epoch's first step
    signals: dict[int, int] = field(default_factory=dict)  # sent to this process once, in that epoch's first step
    val_faults: dict[int, BaseException] = field(default_factory=dict)  # raised once in that epoch's validation
    score: Callable[[int], float] = lambda epoch: round(0.1 + 0.05 * epoch, 5)  # mAP50-95 after 0-based epoch
    attempts: list[Attempt] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[tuple[int, str]] = field(default_factory=list)

    # --- speedtrain.ultra.train -------------------------------------------------------------------------------

    def train(
        self,
        weights: str,
        data_yaml: str | Path,
        args: dict[str, Any],
        callbacks: dict[str, list[Callable[[Any], None]]],
        *,
        resume: Path | None = None,
        fast: bool = False,
    ) -> tuple[Any, Any]:
        if resume is not None:
            ckpt = torch.load(resume, map_location="cpu", weights_only=False)
            used = dict(ckpt["train_args"]) | {k: args[k] for k in RESUME_ALLOWED if k in args}
            start, best = int(ckpt["epoch"]) + 1, ckpt["best_fitness"]
            assert 0 < start < used["epochs"], f"{resume} training to {used['epochs']} epochs is finished"
        else:
            used, start, best = dict(args) | {"model": weights, "data": str(data_yaml)}, 0, None
        trainer = _Trainer(used, self.images, start, best, callbacks)
        attempt = Attempt(trainer.batch_size, start, str(resume) if resume else None, used)
        self.attempts.append(attempt)
        if trainer.csv.exists() and resume is None:
            trainer.csv.unlink()
        trainer.run("on_pretrain_routine_start")
        trainer.run("on_pretrain_routine_end")
        trainer.run("on_train_start")
        for epoch in range(start, trainer.epochs):
            trainer.epoch = epoch
            trainer.run("on_train_epoch_start")
            for step in range(len(trainer.train_loader)):
                trainer.run("on_train_batch_start")
                if step == 0:
                    self._fault(trainer)
                trainer.run("on_train_batch_end")
            trainer.run("on_train_epoch_end")
            final = epoch + 1 >= trainer.epochs
            if trainer.args.val or final:
                trainer.validate(self.score(epoch), self.val_faults.pop(epoch, None))
            trainer.save_metrics()
            trainer.stop |= final
            trainer.save_model()
            attempt.epochs_run.append(epoch)
            trainer.run("on_model_save")
            trainer.run("on_fit_epoch_end")
            if trainer.stop:
                break
        metrics = self._final_eval(trainer)
        trainer.run("on_train_end")
        return trainer, metrics

    def _fault(self, trainer: _Trainer) -> None:
        epoch = trainer.epoch
        if self.oom_above is not None and epoch >= self.oom_from_epoch and trainer.batch_size > self.oom_above:
            raise torch.OutOfMemoryError(CUDA_OOM)
        if epoch in self.faults:
            raise self.faults.pop(epoch)
        if epoch in self.signals:
            os.kill(os.getpid(), self.signals.pop(epoch))  # the handler runs here, in the main thread

    def _final_eval(self, trainer: _Trainer) -> Any:
        """final_eval(): strip last.pt and best.pt, validate best.pt (validator.training False) at the trainer's
        batch, and fire on_fit_epoch_end once more with the epoch one past the last."""
        for path in (trainer.last, trainer.best):
            if path.exists():
                _strip(path)
        if not trainer.best.exists():
            return None
        validator = types.SimpleNamespace(training=False, args=types.SimpleNamespace(batch=trainer.batch_size))
        trainer.run("on_val_start", validator)
        metrics = self.validate(trainer.best, trainer.args.data, batch=trainer.batch_size, imgsz=trainer.args.imgsz)
        trainer.run("on_val_end", validator)
        trainer.metrics = metrics.results_dict
        trainer.epoch += 1
        trainer.run("on_fit_epoch_end")
        trainer.epoch -= 1
        return metrics

    # --- speedtrain.ultra.validate and latency_ms ---------------------------------------------------------------

    def validate(self, weights: str | Path, data_yaml: str | Path, **args: Any) -> Any:
        self.validations.append({"weights": str(weights), **args})
        if self.val_oom_above is not None and int(args.get("batch") or 16) > self.val_oom_above:
            raise torch.OutOfMemoryError(CUDA_OOM)
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
        trained = ckpt["train_metrics"]["metrics/mAP50-95(B)"]
        imgsz, at = int(ckpt["train_args"]["imgsz"]), int(args.get("imgsz") or 640)
        return _Metrics(round(trained * min(1.0, imgsz / at) ** 0.5, 5))  # larger than trained: scores fall

    def latency_ms(self, weights: str | Path, imgsz: int, device: str, runs: int = 20, warmup: int = 3) -> float:
        self.latencies.append((imgsz, device))
        return round(0.5 * (imgsz / 64) ** 2, 2)


class _Metrics:
    """What model.train() and model.val() return: a DetMetrics with its results_dict."""

    def __init__(self, map50_95: float) -> None:
        self.results_dict = {
            "metrics/precision(B)": 0.5,
            "metrics/recall(B)": 0.4,
            "metrics/mAP50(B)": round(min(1.0, map50_95 * 1.6), 5),
            "metrics/mAP50-95(B)": map50_95,
            "fitness": map50_95,
        }


class _Trainer:
    """The attributes of a DetectionTrainer that speedtrain's callbacks read and write."""

    def __init__(
        self, args: dict[str, Any], images: int, start: int, best: float | None, callbacks: dict[str, list[Any]]
    ) -> None:
        self.args = types.SimpleNamespace(**{"val": True, "time": None, "cache": False, "imgsz": 640} | args)
        self.epochs = int(self.args.epochs)
        self.batch_size = int(self.args.batch)
        self.start_epoch, self.epoch = start, start
        self.save_dir = Path(self.args.project) / self.args.name
        self.wdir = self.save_dir / "weights"
        self.last, self.best, self.csv = self.wdir / "last.pt", self.wdir / "best.pt", self.save_dir / "results.csv"
        self.train_loader = _Loader(images, self.batch_size)
        self.device = torch.device("cpu")
        self.metrics: dict[str, float] = {}
        self.fitness: float | None = None
        self.best_fitness = best
        self.stop = False
        self.stopper = types.SimpleNamespace(patience=int(getattr(self.args, "patience", 100) or 100))
        self.callbacks = callbacks
        self.tloss = 1.0

    def run(self, event: str, subject: Any = None) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self if subject is None else subject)

    def validate(self, score: float, fault: BaseException | None = None) -> None:
        validator = types.SimpleNamespace(training=True, args=types.SimpleNamespace(batch=self.batch_size * 2))
        self.run("on_val_start", validator)
        if fault is not None:
            raise fault
        self.metrics = _Metrics(score).results_dict
        self.fitness = score
        self.run("on_val_end", validator)
        if self.best_fitness is None or score >= self.best_fitness:
            self.best_fitness = score

    def save_metrics(self) -> None:
        keys = ("train/box_loss", "train/cls_loss", "train/dfl_loss", *self.metrics)
        loss = round(self.tloss / (self.epoch + 1), 5)
        values = (loss, loss, loss, *self.metrics.values())
        rows = self.csv.read_text(encoding="utf-8").splitlines() if self.csv.exists() else []
        elapsed = 1.0 + (float(rows[-1].split(",")[1]) if len(rows) > 1 else 0.0)  # seconds, cumulative
        header = "" if rows else ",".join(("epoch", "time", *keys)) + "\n"
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        with self.csv.open("a", encoding="utf-8") as f:
            f.write(header + ",".join(str(v) for v in (self.epoch + 1, elapsed, *values)) + "\n")

    def save_model(self) -> None:
        ckpt = {
            "epoch": self.epoch,
            "best_fitness": self.best_fitness,
            "model": None,
            "ema": {"weights": self.epoch},
            "optimizer": {"state": self.epoch},
            "train_args": vars(self.args),
            "train_metrics": {**self.metrics, "fitness": self.fitness},
        }
        self.wdir.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, self.last)
        fitness = self.fitness
        if fitness is not None and not math.isnan(fitness) and fitness == self.best_fitness:
            torch.save(ckpt, self.best)


class _Loader:
    def __init__(self, images: int, batch: int) -> None:
        self.dataset = range(images)
        self.batch = batch

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.dataset) / self.batch))


def _strip(path: Path) -> None:
    """utils/torch_utils.py strip_optimizer: the EMA becomes the model, the optimizer and epoch go."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt.update(model=ckpt["ema"], ema=None, optimizer=None, best_fitness=None, epoch=-1)
    torch.save(ckpt, path)
