"""A run planned against its deadline: resolution phases, one learning-rate curve that reaches zero at the deadline,
a warmup sized for the start, mosaic closed and validation placed by the budget. Pure: no I/O, no torch.

`plan_schedule` decides the phases from the budget, the size the model is scored at and the dataset's small boxes;
`Deadline` follows the schedule during training from what it measures (seconds per image at each size, the
validation's length), so that the last phase ends at the deadline whatever the machine. One Ultralytics run
trains every phase: the optimizer's state, the EMA and the learning-rate curve go on across each boundary.

Where the shape comes from: FFCV's ResNet-50 recipes train most epochs at low resolution and end at a higher one
with one linear-to-zero schedule stretched over the budget; Composer's progressive resizing (half size for the
first half, full size for the last fifth); FixRes (train low, finish at the test size); "Budgeted Training" (Li,
Yumer, Ramanan, ICLR 2020) and REX (arXiv 2107.04197): a learning rate decayed linearly to zero at the end of
whatever budget there is beats the usual schedules at small budgets, COCO detection included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

STRIDE = 32  # Ultralytics' image sizes are multiples of the model's largest stride
MIN_BOX_PX = 8.0  # YOLO's finest head (P3) has a stride of 8: a box under ~8 px spans less than one of its cells
SMALL_BOX_QUANTILE = 0.1  # the lowest phase keeps the dataset's 10th-percentile box at MIN_BOX_PX or more
LOWEST_FACTOR = 0.5  # the lowest phase is at least half the final size (4x fewer pixels)
MID_IMGSZ = 416  # the single size measured best for a whole run (see planner.EVIDENCE["imgsz"])
# the budget's shares by number of phases: Composer's half-size first half, FFCV's low-resolution majority; the last
# phase at the size the model is scored at
SHARES = {1: (1.0,), 2: (0.7, 0.3), 3: (0.5, 0.3, 0.2)}
WARMUP_SHARE = {True: 0.05, False: 0.15}  # pretrained: about one epoch of twenty; from scratch: Ultralytics' 3 of 20
CLOSE_MOSAIC_SHARE = 0.1  # mosaic off for the last tenth of the budget (Ultralytics: the last 10 of 100 epochs)
MAX_PHASES = max(SHARES)
STOP_TAIL = 0.05  # an epoch end this close to the deadline (as a share of an epoch) ends the run there
VAL_COST = 0.5  # a validation image against a training image at the same size, until a validation is measured


@dataclass(frozen=True, slots=True)
class Phase:
    imgsz: int
    share: float  # of the training time


@dataclass(frozen=True, slots=True)
class Schedule:
    """The plan of a budgeted run: phases of rising image size, each a share of the budget; a linear warmup, then
    one linear decay to zero at the deadline; mosaic off for the budget's last `close_mosaic` share."""

    budget_s: float
    phases: tuple[Phase, ...]
    warmup: float  # share of the budget
    close_mosaic: float  # share of the budget at its end without mosaic

    @property
    def final_imgsz(self) -> int:
        return self.phases[-1].imgsz

    @property
    def first_imgsz(self) -> int:
        return self.phases[0].imgsz

    def starts(self) -> tuple[float, ...]:
        """Each phase's start as a share of the training time."""
        out, at = [], 0.0
        for p in self.phases:
            out.append(round(at, 6))
            at += p.share
        return tuple(out)

    def lr(self, p: float) -> float:
        """The planned learning rate (a factor of the peak) at share `p` of the training time."""
        if p < self.warmup:
            return p / self.warmup
        return max(0.0, (1 - p) / (1 - self.warmup)) if self.warmup < 1 else 0.0

    def rows(self) -> tuple[tuple[int, float, float, float], ...]:
        """Per phase: (image size, share, learning-rate factor at its start, at its end)."""
        starts = self.starts()
        return tuple(
            (ph.imgsz, ph.share, round(self.lr(s), 4), round(self.lr(s + ph.share), 4))
            for ph, s in zip(self.phases, starts, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        phases = tuple(Phase(int(p["imgsz"]), float(p["share"])) for p in d["phases"])
        return cls(float(d["budget_s"]), phases, float(d["warmup"]), float(d["close_mosaic"]))


def round_size(px: float) -> int:
    return max(STRIDE, math.ceil(px / STRIDE) * STRIDE)


def lowest_size(final: int, small_box_px: float | None) -> tuple[int, str]:
    """The lowest phase's size: half the final size, or more where the dataset's small boxes (their 10th percentile,
    `small_box_px` at the final size) would shrink under MIN_BOX_PX."""
    half = round_size(final * LOWEST_FACTOR)
    if small_box_px is None or small_box_px <= 0:
        return half, f"{half}: half of {final} (no box sizes known)"
    need = round_size(final * MIN_BOX_PX / small_box_px)
    at_half = small_box_px * half / final
    if need <= half:
        return half, (
            f"{half}: half of {final}; the dataset's small boxes (10th percentile {small_box_px:.0f} px at "
            f"{final}) are still {at_half:.0f} px there, at least the {MIN_BOX_PX:.0f} px of YOLO's finest "
            "grid"
        )
    return min(need, final), (
        f"{min(need, final)}: the dataset's small boxes (10th percentile {small_box_px:.0f} px at {final}) stay at "
        f"least {MIN_BOX_PX:.0f} px (YOLO's finest grid); at half size they would be {at_half:.0f} px"
    )


def plan_schedule(
    budget_s: float,
    final: int,
    first: int | None,
    small_box_px: float | None,
    pretrained: bool,
    sizes: tuple[int, ...] = (),
    shares: tuple[float, ...] = (),
) -> tuple[Schedule, str]:
    """The phases for `budget_s` seconds of training that end at `final` px: `sizes` as given (--phases), or from
    `first` (the user's --img-size) or the lowest size the boxes allow, through MID_IMGSZ when it lies between;
    with SHARES of the budget."""
    if sizes:
        low, why = sizes[0], f"{sizes[0]}: set by user (--phases)"
    elif first is not None:
        low, why = first, f"{first}: set by user (--img-size)"
    else:
        low, why = lowest_size(final, small_box_px)
    if not sizes:
        sizes = (low,) if low >= final else (low, *([MID_IMGSZ] if low < MID_IMGSZ < final else []), final)
    given = tuple(round(s / sum(shares), 6) for s in shares) if shares else SHARES[len(sizes)]
    phases = tuple(Phase(s, share) for s, share in zip(sizes, given, strict=True))
    schedule = Schedule(float(budget_s), phases, WARMUP_SHARE[pretrained], CLOSE_MOSAIC_SHARE)
    return schedule, why


# --- following the schedule while training ------------------------------------------------------------------------


@dataclass(slots=True)
class EpochEnd:
    """What the run does after an epoch: validate it, stop, the next epoch's size and mosaic, the epochs to show."""

    validate: bool
    stop: bool
    next_imgsz: int
    close_mosaic: bool
    epochs: int  # the run's epochs as now projected (at least one more than done unless it stops)
    why: str = ""  # why it stops here


@dataclass(slots=True)
class Deadline:
    """The schedule followed on a clock of training seconds (`t`: since the run's first epoch began, validation
    pauses included, resumed runs going on from their saved time). The learning rate rises linearly over the warmup,
    then falls linearly to zero at `end`: the budget less the time the last validation takes. When `end` moves (a
    validation measured), the curve is re-anchored where it is, so it stays continuous."""

    schedule: Schedule
    images: int = 0  # training images per epoch
    phase: int = 0
    closed: bool = False  # mosaic closed
    per_image: dict[int, float] = field(default_factory=dict)  # measured training seconds per image, by size
    val_s: float | None = None  # the last measured validation
    val_images: int = 0
    end: float = 0.0  # training-clock seconds at which the training passes stop
    anchor: tuple[float, float] = (0.0, 1.0)  # (t, lr factor) the decay runs from
    stopped: str = ""  # why the run stopped ("" while it goes on)
    log: list[dict[str, Any]] = field(default_factory=list)  # per epoch: size, start, end, lr, validated

    def __post_init__(self) -> None:
        if not self.end:
            self.end = self.schedule.budget_s
            self.anchor = (self.warmup_s, 1.0)

    @property
    def warmup_s(self) -> float:
        return self.schedule.warmup * self.schedule.budget_s

    @property
    def imgsz(self) -> int:
        return self.schedule.phases[self.phase].imgsz

    def lr(self, t: float) -> float:
        """The learning-rate factor (of the peak) at training-clock second `t`."""
        if t < self.warmup_s:
            return max(t, 0.0) / self.warmup_s
        t_a, f_a = self.anchor
        if self.end <= t_a:
            return 0.0
        return max(0.0, f_a * (self.end - max(t, t_a)) / (self.end - t_a))

    def move_end(self, t: float, end: float) -> None:
        """Stop the training passes at `end` from now on, keeping the learning rate continuous at `t`."""
        end = max(end, t)
        if t >= self.warmup_s:
            self.anchor = (t, self.lr(t))
        self.end = end

    def seconds_per_image(self, imgsz: int) -> float | None:
        """Measured at `imgsz`, else scaled by pixels from the nearest measured size (an estimate)."""
        if imgsz in self.per_image:
            return self.per_image[imgsz]
        if not self.per_image:
            return None
        near = min(self.per_image, key=lambda s: abs(s - imgsz))
        return self.per_image[near] * (imgsz / near) ** 2

    def epoch_s(self, imgsz: int) -> float | None:
        per = self.seconds_per_image(imgsz)
        return per * self.images if per is not None and self.images else None

    def measured(self, imgsz: int, seconds: float, images: int) -> None:
        """An epoch's training pass at `imgsz` took `seconds` for `images` images."""
        if seconds > 0 and images > 0:
            self.per_image[imgsz] = seconds / images

    def validated(self, t: float, seconds: float) -> None:
        """A validation took `seconds`: the training passes end that much before the budget."""
        self.val_s = seconds
        self.move_end(t, self.schedule.budget_s - seconds)

    def reserve(self, t: float) -> None:
        """Keep the final validation's time (estimated until measured) off the training passes' end."""
        self.move_end(t, self.schedule.budget_s - self.reserve_estimate())

    def reserve_estimate(self) -> float:
        """The final validation's seconds: measured, or estimated from the final size's training pace."""
        if self.val_s is not None:
            return self.val_s
        per = self.seconds_per_image(self.schedule.final_imgsz)
        return per * self.val_images * VAL_COST if per and self.val_images else 0.0

    def boundary(self, index: int) -> float:
        """Training-clock second at which phase `index` starts."""
        return self.schedule.starts()[index] * self.end

    def should_stop(self, t: float) -> bool:
        return t >= self.end

    def epoch_end(self, t: float, epoch: int, cut: bool = False) -> EpochEnd:
        """After the 0-based `epoch`'s training pass ended at `t` (`cut`: stopped at the deadline mid-epoch)."""
        d = self.epoch_s(self.imgsz) or 0.0
        if self.val_s is None and not cut:
            self.reserve(t)
        if cut or t >= self.end or (d and self.end - t < STOP_TAIL * d):
            self.stopped = self.stopped or "the deadline"
            return EpochEnd(True, True, self.imgsz, self.closed, epoch + 1, f"deadline reached at epoch {epoch + 1}")
        last = len(self.schedule.phases) - 1
        while self.phase < last and t + (self.epoch_s(self.imgsz) or 0.0) / 2 >= self.boundary(self.phase + 1):
            self.phase += 1
        following = self.epoch_s(self.imgsz) or d  # the next epoch, at its own size: closed if mostly in the tail
        if not self.closed and t + following / 2 >= self.end - self.schedule.close_mosaic * self.schedule.budget_s:
            self.closed = True
        if following and following < self.end - t < (1 + STOP_TAIL) * following:
            self.move_end(t, t + following)  # a sliver would be left after the next epoch: the curve ends with it
        # validated only at the end: nothing earlier is decided by a score (no early stop, best.pt is the annealed
        # model), and on a CPU each validation at the final size costs about an epoch's share of the budget
        return EpochEnd(False, False, self.imgsz, self.closed, max(epoch + 2, self.projected(t, epoch)))

    def projected(self, t: float, epoch: int) -> int:
        """Epochs the run will have trained at the deadline (an estimate from the measured pace)."""
        done, left = epoch + 1, 0.0
        starts = self.schedule.starts()
        for i in range(self.phase, len(self.schedule.phases)):
            begin = max(t, starts[i] * self.end)
            finish = starts[i + 1] * self.end if i + 1 < len(starts) else self.end
            d = self.epoch_s(self.schedule.phases[i].imgsz)
            if d and finish > begin:
                left += (finish - begin) / d
        return done + math.ceil(left - 1e-9)

    def fits(self) -> str:
        """One line: the epochs each phase gets at the measured pace (an estimate), or why the budget is short."""
        parts = []
        for i, ph in enumerate(self.schedule.phases):
            d = self.epoch_s(ph.imgsz)
            if not d:
                return ""
            if i == 0 and d > self.end:
                return (
                    f"the budget ({self.schedule.budget_s:.0f} s) is shorter than one epoch at {ph.imgsz} px "
                    f"(about {d:.0f} s): training stops {self.end / d:.0%} into the first epoch, and the later "
                    "phases do not run"
                )
            parts.append(f"{ph.share * self.end / d:.1f} at {ph.imgsz}")
        return "epochs per phase (estimate): " + ", ".join(parts)

    def record(
        self, epoch: int, imgsz: int, span: tuple[float, float], lrs: tuple[float, float], validated: bool, mosaic: bool
    ) -> None:
        """One epoch in the log: its size, its (start, end) on the clock, the learning-rate factors there."""
        start, end = span
        self.log.append(
            {
                "epoch": epoch + 1,
                "imgsz": imgsz,
                "start_s": round(start, 2),
                "end_s": round(end, 2),
                "lr_start": round(lrs[0], 5),
                "lr_end": round(lrs[1], 5),
                "validated": validated,
                "mosaic": mosaic,
            }
        )

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on along the same curve."""
        return {
            "schedule": self.schedule.to_dict(),
            "phase": self.phase,
            "closed": self.closed,
            "per_image": {str(k): v for k, v in self.per_image.items()},
            "val_s": self.val_s,
            "end": self.end,
            "anchor": list(self.anchor),
            "stopped": self.stopped,
            "log": self.log,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Deadline:
        return cls(
            schedule=Schedule.from_dict(d["schedule"]),
            phase=int(d["phase"]),
            closed=bool(d["closed"]),
            per_image={int(k): float(v) for k, v in d.get("per_image", {}).items()},
            val_s=d.get("val_s"),
            end=float(d["end"]),
            anchor=(float(d["anchor"][0]), float(d["anchor"][1])),
            stopped=str(d.get("stopped", "")),
            log=list(d.get("log", [])),
        )


def simulate(
    schedule: Schedule, seconds_per_image: dict[int, float], images: int, val_s: float = 0.0, val_images: int = 0
) -> Deadline:
    """Follow `schedule` on a simulated clock (each size's seconds per image, a validation's seconds): the run as
    Deadline plays it, batch by batch of 1/20 epoch. For the plan's preview and the tests."""
    dl = Deadline(schedule, images=images, val_images=val_images)
    t, epoch = 0.0, 0
    while epoch < 100_000:
        imgsz, start, lr_start, mosaic = dl.imgsz, t, dl.lr(t), not dl.closed
        per = seconds_per_image[imgsz]
        cut = False
        for _ in range(20):
            if dl.should_stop(t):
                cut = True
                break
            t += per * images / 20
        dl.measured(imgsz, (t - start), images if not cut else max(1, round(images * (t - start) / (per * images))))
        dl.per_image[imgsz] = per
        lr_end = dl.lr(t)
        step = dl.epoch_end(t, epoch, cut)
        dl.record(epoch, imgsz, (start, t), (lr_start, lr_end), step.validate, mosaic)
        if step.validate and val_s:
            t += val_s
            if not step.stop:
                dl.validated(t, val_s)
        if step.stop:
            break
        epoch += 1
    return dl


# --- validation during a stage (--val-every) ------------------------------------------------------------------------

# --val-every auto: validate every k epochs so that validation stays under VAL_SHARE of the run (one Ultralytics
# user measured 12 min of validation against 30 s of training per epoch, ultralytics #17523)
VAL_SHARE = 0.15
VAL_EVERY_MAX = 10  # auto never validates less often than every 10 epochs
VAL_LAST = 2  # the last epochs of a stage are always validated (best.pt is chosen among validated epochs)


def val_every_for(train_s: float, val_s: float, epochs: int, share: float = VAL_SHARE) -> int:
    """--val-every auto: validate every k epochs, the smallest k that keeps one validation (val_s) under `share` of
    the time from one validation to the next (k training passes of train_s, then val_s): k >= v(1-s)/(s t).
    Capped at VAL_EVERY_MAX and at a quarter of the stage's epochs, so that a stage is still validated often."""
    if train_s <= 0 or val_s <= 0 or val_s / (train_s + val_s) <= share:
        return 1
    k = math.ceil(val_s * (1 - share) / (share * train_s))
    return max(1, min(k, VAL_EVERY_MAX, epochs // 4))


@dataclass(slots=True)
class Cadence:
    """Which epochs of a stage are validated: every `every` (1: every epoch, as Ultralytics; 0: auto, decided from
    the first epoch's measured times, which is validated to measure them), always the last VAL_LAST, and patience
    (the stage's, in validated epochs) scaled to count epochs. Fed the measured seconds of each epoch's training
    pass and validation (1-based epochs); ultra.ValCadence applies its answers to Ultralytics' trainer."""

    every: int = 1
    share: float = VAL_SHARE
    patience: int = 0  # the stage's patience in validated epochs (0: off)
    decided: int | None = None  # the cadence in use; None until auto has measured
    train_s: dict[int, float] = field(default_factory=dict)  # epoch -> training pass seconds
    val_s: dict[int, float] = field(default_factory=dict)  # validated epoch -> validation seconds
    skipped: list[int] = field(default_factory=list)

    @property
    def cadence(self) -> int:
        return self.every if self.every > 0 else self.decided or 1

    def validates(self, epoch: int, epochs: int) -> bool:
        """Whether `epoch` of `epochs` is validated."""
        k = self.cadence
        first = epoch == 1 and self.every == 0  # auto times the first validation to decide
        return k == 1 or first or epoch % k == 0 or epoch > epochs - VAL_LAST

    def trained(self, epoch: int, seconds: float, epochs: int) -> bool:
        """`epoch`'s training pass took `seconds`: whether it is validated."""
        self.train_s[epoch] = seconds
        return self.validates(epoch, epochs)

    def counted(self, epoch: int) -> bool:
        """Whether `epoch` is already counted (or was never trained here): nothing more to record."""
        return epoch not in self.train_s or epoch in self.val_s or epoch in self.skipped

    def validated(self, epoch: int, seconds: float | None, epochs: int) -> int:
        """`epoch` was validated in `seconds` (None: not validated); the patience in epochs for early stopping
        (0: leave it as it is)."""
        if seconds is None:
            self.skipped.append(epoch)
            return 0
        self.val_s[epoch] = seconds
        if self.every == 0 and self.decided is None:
            self.decided = val_every_for(self.train_s[epoch], seconds, epochs, self.share)
        k = self.cadence
        return self.patience * k if k > 1 and self.patience else 0

    def saved_s(self) -> float:
        """Validation time the skipped epochs did not spend (estimate: the mean measured validation each)."""
        return len(self.skipped) * (sum(self.val_s.values()) / len(self.val_s)) if self.val_s else 0.0
