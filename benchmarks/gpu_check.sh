#!/usr/bin/env bash
# The GPU acceptance in one call: writes OUT/gpu_check.md (tables a person reads) and OUT/gpu_check.json.
#
#   benchmarks/gpu_check.sh OUT [--cpu] [--work DIR] [--source DIR]
#
# Run from anywhere on a machine with one CUDA GPU; needs no network. Ultralytics, ultralytics-thop and polars
# are installed from wheels in .whl/ when `import ultralytics` fails (see the README, "GPU acceptance"), into a
# private folder, never into the system Python. Each step runs in its own process under its own time limit,
# logs to OUT/logs/STEP.log, and a step that fails or times out becomes a "failed" row naming its log's last line,
# so one failure does not eat the rest. --cpu is a smoke run at tiny sizes (CI runs it so the script cannot rot).
# The whole run stops starting steps after GPU_CHECK_BUDGET_S (default 560 s; --cpu: 900 s) and fits one
# 10-minute call.
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_check.sh OUT [--cpu] [--work DIR] [--source DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
mode=gpu work="" source=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --work) work=${2:?}; shift ;;
    --source) source=${2:?}; shift ;;
    *) usage ;;
  esac
  shift
done

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
[ -n "$work" ] || work=$(mktemp -d "${TMPDIR:-/tmp}/speedtrain-gpu-check.XXXXXX")
mkdir -p "$work"
rm -rf "$out/steps" "$out/settings.json"

py=${PYTHON:-python3}
if [ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then py=$repo/.venv/bin/python; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export YOLO_OFFLINE=1 YOLO_CONFIG_DIR="$work/yolo-config" YOLO_VERBOSE=False

# Ultralytics from carried wheels where it is missing (the GPU machine has torch and the rest, not Ultralytics).
if ! "$py" -c "import ultralytics" 2>/dev/null; then
  if ! ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: ultralytics is not installed and $repo/.whl has no wheels to install it from" >&2
    exit 3
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
    "$repo"/.whl/*.whl >"$out/logs/setup.log" 2>&1 || { echo "gpu_check: installing the wheels failed (logs/setup.log)" >&2; exit 3; }
  export PYTHONPATH="$PYTHONPATH:$work/site"
fi

budget=${GPU_CHECK_BUDGET_S:-560}  # the whole run, so that it ends inside one 10-minute device call
step() {  # step NAME SECONDS ARGS...: one step of gpu_check.py under its own limit, within what is left
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "skipped: the ${budget} s budget of the whole check was spent" >"$out/logs/$name.log"
    printf 'gpu_check: %-14s skipped (budget spent)\n' "$name" >&2
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$py" "$repo/benchmarks/gpu_check.py" "$@" --out "$out" --work "$work" \
    >"$out/logs/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "timed out after $limit s" >>"$out/logs/$name.log"
  printf 'gpu_check: %-14s exit %3d  %4d s\n' "$name" "$rc" $((SECONDS - t0)) >&2
}

if [ "$mode" = cpu ]; then budget=${GPU_CHECK_BUDGET_S:-900} row=180; else row=75; fi
step facts 30 facts
step probe 30 probe
step dataset 60 dataset --mode "$mode" ${source:+--source "$source"}
step floor 60 floor
step defaults "$row" plain --row defaults
step plan-settings "$row" plain --row plan-settings
step plan "$row" speedtrain --row plan
step fast "$row" speedtrain --row fast
step autotune $((row + 60)) speedtrain --row autotune
step deterministic "$row" speedtrain --row deterministic
step oom 90 oom
step ctrlc 150 ctrlc
step compare 200 compare
step torchrun "$row" speedtrain --row torchrun
"$py" "$repo/benchmarks/gpu_check.py" report --out "$out" --work "$work" 2>"$out/logs/report.log"
rc=$?
case $work in "${TMPDIR:-/tmp}"/speedtrain-gpu-check.*) rm -rf "$work" ;; esac
exit $rc
