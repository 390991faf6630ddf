#!/usr/bin/env python3
"""The single-script dataset tool: `python optimize_training_speed.py --resize --dataset dataset`.

--resize is `speedtrain prepare` (a resized copy beside the dataset, or --in-place), --check is `speedtrain check`;
with both, the check runs first and its findings do not stop the resize (unreadable images are skipped there).
"""

from __future__ import annotations

import argparse
import sys

from speedtrain.cli import main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimize_training_speed.py", description=__doc__.splitlines()[0])
    p.add_argument("--resize", action="store_true", help="write a resized copy (speedtrain prepare)")
    p.add_argument("--check", action="store_true", help="validate the dataset (speedtrain check)")
    p.add_argument("--dataset", "-d", required=True, help="dataset folder or data yaml")
    p.add_argument("--size", "-s", type=int, default=416, help="long side after resizing (default 416)")
    p.add_argument("--out", "-o", help="output folder (default DATASET_SIZE beside the dataset)")
    p.add_argument("--workers", "-w", type=int, help="processes (default all cores)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    p.add_argument("--in-place", action="store_true", help="overwrite the images themselves, atomically")
    return p


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not (args.resize or args.check):
        _parser().error("say what to do: --resize, --check, or both")
    common = ["--dataset", args.dataset] + (["--workers", str(args.workers)] if args.workers else [])
    code = 0
    if args.check:
        code = _call(["check", *common])
    if args.resize:
        extra = ["--size", str(args.size), "--quality", str(args.quality)]
        extra += (["--out", args.out] if args.out else []) + (["--in-place"] if args.in_place else [])
        code = _call(["prepare", *common, *extra]) or code
    return code


def _call(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
