#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has torch,
# opencv, psutil, nvidia-ml-py, typer and rich but not Ultralytics (and no network). They land in .whl/ (ignored
# by git, about 32 MB: carry it to the GPU machine with the working tree).
#   benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU machine's Python
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
rm -rf .whl && mkdir .whl
# polars 0.20.0 (28 MB) satisfies Ultralytics' polars>=0.20.0; polars 2.x needs a 54 MB runtime wheel as well.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${plat[@]}" -d .whl ultralytics==8.4.190 ultralytics-thop==2.2.3 ultralytics-platform==0.1.99 polars==0.20.0
ls -la .whl
du -sh .whl
