#!/usr/bin/env bash
# One click, from a fresh clone: virtual environment, install, check the dataset, pre-resize it when that pays
# off, train with the automatic plan, and show the speed report.
#
#   ./quick_train_ultra_fast.sh                      # the embedded sample
#   ./quick_train_ultra_fast.sh path/to/dataset      # your dataset
#   ./quick_train_ultra_fast.sh path/to/dataset --epochs 30 --finetune yes mosaic=0.5   # flags go to train.py
#
# An active virtual environment (VIRTUAL_ENV) is used as it is; otherwise .venv here is created or reused.
# pip only ever runs inside that environment.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
REPO="$(pwd)"

fail() { echo "quick_train_ultra_fast.sh: $*" >&2; exit 1; }
step() { echo; echo "==> [$1/5] $2"; }

DATASET="$REPO/speedtrain/sample"
if [[ $# -gt 0 && "$1" != -* ]]; then
  DATASET="$1"
  shift
fi
[[ -e "$DATASET" ]] || fail "dataset not found: $DATASET"
PROJECT="runs/speedtrain"  # where train.py puts run folders, unless a --project flag says otherwise
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --project) PROJECT="${args[i + 1]:-$PROJECT}" ;;
    --project=*) PROJECT="${args[i]#--project=}" ;;
  esac
done

step 1 "virtual environment"
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  VENV="$VIRTUAL_ENV"
  echo "using the active environment $VENV"
else
  VENV="$REPO/.venv"
  if [[ ! -x "$VENV/bin/python" ]]; then
    PYTHON="$(command -v python3 || command -v python || true)"
    [[ -n "$PYTHON" ]] || fail "no python3 found; install Python 3.10 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python 3.10 or newer is needed"
    "$PYTHON" -m venv "$VENV" || fail "could not create $VENV (on Debian/Ubuntu: apt install python3-venv)"
    echo "created $VENV"
  else
    echo "reusing $VENV"
  fi
fi
PY="$VENV/bin/python"
[[ -x "$PY" ]] || fail "no python in $VENV"

step 2 "install speedtrain and its dependencies"
STAMP="$VENV/.speedtrain-installed"
if [[ -f "$STAMP" && "$STAMP" -nt requirements.txt && "$STAMP" -nt pyproject.toml ]] && "$PY" -c "import speedtrain, ultralytics" 2>/dev/null; then
  echo "already installed"
else
  "$PY" -m pip install --disable-pip-version-check -q -r requirements.txt || fail "pip install failed (see above)"
  touch "$STAMP"
fi

step 3 "check the dataset"
set +e
"$PY" -m speedtrain check --dataset "$DATASET"
status=$?
set -e
case $status in
  0) ;;
  1) echo "problems listed above: unreadable images are skipped; training stops only on errors" ;;
  *) fail "the dataset check failed (exit $status)" ;;
esac

step 4 "pre-resize (when most images are much larger than the training size) and train"
"$PY" train.py --dataset "$DATASET" --prepare auto "$@" || fail "training failed (exit $?)"

step 5 "speed report"
NEWEST='import sys, pathlib; r = sorted(pathlib.Path(sys.argv[1]).glob("*/speed_report.json"), key=lambda p: p.stat().st_mtime); print(r[-1].parent if r else "")'
REPORT="$("$PY" -c "$NEWEST" "$PROJECT")"
[[ -n "$REPORT" ]] || fail "no speed report found in $PROJECT"
echo "report: $REPORT/speed_report.json and $REPORT/speed_report.png"
echo "show it again: $PY -m speedtrain report $REPORT"
