#!/usr/bin/env python3
"""The single-script entry point: `python train.py --dataset dataset --epochs 50 --batch-size 32 --img-size 416`.

Same as `speedtrain train ...`; with no --dataset it trains on the embedded sample.
"""

import sys

from speedtrain.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
