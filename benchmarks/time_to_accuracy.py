#!/usr/bin/env python3
"""The time-to-accuracy table of one or more `speedtrain compare` runs, as markdown (for the README and the docs).

    python benchmarks/time_to_accuracy.py runs/speedtrain/compare [more compare folders or compare.json files]
        [--png curves.png]

Several runs of the same comparison (same dataset, model, budget and machine; e.g. a second call for more arms, or
another --seed) are read as one: the first run's `defaults` arm sets the target, the baseline's final mAP50-95 at
the common validation size, and an arm name seen again gets its run's folder name and seed appended. Columns:
image size (a budgeted arm's phases), batch, epochs trained in the budget, steady training images/s, the final
weights' mAP50-95 at each validation size, the network's latency at 640 (batch 1), when the arm first reached the
baseline's final accuracy (seconds since its start, and as a share of the baseline's own time), with a longer
baseline budget also when it reached the baseline's best within the arms' budget, and its note.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speedtrain.comparison import Comparison, fmt_map  # noqa: E402


def merged(paths: list[Path]) -> Comparison:
    """One comparison holding every arm of the given runs, the first run's setting and baseline."""
    runs = [Comparison.from_json(p) for p in paths]
    first, arms, seen = runs[0], [], set()
    for run in runs:
        for arm in run.arms:
            name = arm.name if arm.name not in seen else f"{arm.name} ({Path(run.run_dir).name}, seed {run.seed})"
            seen.add(name)
            arms.append(replace(arm, name=name))
    sizes = tuple(sorted({s for r in runs for s in r.val_sizes}))
    return replace(
        first, arms=tuple(arms), val_sizes=sizes, requested=tuple(a.name for a in arms), model=Path(first.model).name
    )


def table(c: Comparison) -> str:
    """The markdown table, then the setting it was measured in."""
    longer = bool(c.baseline_budget_s and c.baseline_budget_s > c.budget_s)
    head = [
        "arm",
        "size",
        "batch",
        "epochs",
        "img/s",
        *[f"mAP50-95 @{s}" for s in c.val_sizes],
        "ms @640",
        "reached the defaults' final mAP50-95",
        *(["reached the defaults' best at equal time"] if longer else []),
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in c.arms:
        finals = [a.final_at(s) for s in c.val_sizes]
        latency = dict(a.latency_ms).get(640)
        if a.name == "defaults":
            reach = "(the target)"
        else:
            t = c.time_to_accuracy(a.name)
            reach = (
                f"{t.seconds:.0f} s ({t.ratio:.2f}x the defaults' {t.baseline_seconds:.0f} s)"
                if t.seconds is not None and t.ratio is not None
                else "not within the budget"
            )
        equal = c.equal_budget(a.name) if longer and a.name != "defaults" else None
        at_equal = (
            []
            if not longer
            else [
                "(the target)"
                if a.name == "defaults"
                else "-"
                if equal is None
                else f"{equal.seconds:.0f} s ({equal.seconds / (equal.baseline_seconds or 1):.2f}x the defaults' "
                f"{equal.baseline_seconds or 0:.0f} s to {fmt_map(equal.target or 0)})"
                if equal.seconds is not None
                else "not within the budget"
            ]
        )
        cells = [
            a.name,
            a.size,
            str(a.batch),
            str(a.epochs_done),
            f"{a.images_per_s:.1f}" if a.images_per_s else "-",
            *[fmt_map(f.map50_95) if f else "-" for f in finals],
            f"{latency:.1f}" if latency else "-",
            reach,
            *at_equal,
            a.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    base = c.arm("defaults")
    target = base.final_at(c.val_imgsz) if base else None
    hw = c.hardware
    machine = ", ".join(g.name for g in hw.gpus) or f"CPU, {hw.cpu_cores_logical} cores"
    lines += [
        "",
        f"{c.dataset.name}: {c.dataset.train_images} train / {c.dataset.val_images} val images; {c.model} on "
        f"{c.device} ({machine}, {hw.ram_total_gb:.0f} GB RAM); {c.budget_s / 60:.0f} min per arm"
        + (f" ({c.baseline_budget_s / 60:.0f} min for the defaults)" if longer else "")
        + f", seed {c.seed}; "
        f"{c.started_at[:10]}. Target: the defaults' final mAP50-95 at {c.val_imgsz} px"
        + (f" ({fmt_map(target.map50_95)})" if target else "")
        + "; curves validated at the same size after training, outside the budget.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="compare folders or compare.json files")
    parser.add_argument("--png", type=Path, help="also draw every arm's curve on one axis into this PNG")
    args = parser.parse_args()
    c = merged(args.runs)
    print(table(c))
    if args.png:
        c.save_png(args.png)


if __name__ == "__main__":
    main()
