#!/usr/bin/env bash
# The GPU numbers in ONE prepared call of at most 8 minutes (docs/gpu.md).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repo root,
#                                             # with the wheels of gpu_wheels.sh in .whl
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, tiny shapes, the local venv (CI)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
#
# Writes $OUT/gpu_check.json and $OUT/gpu_check.log ($OUT: the device tool's output
# folder; elsewhere a fresh /tmp/gpu_check.* folder unless OUT is set). Every part
# runs in its own time-boxed subprocess; the driver stops before GPU_CHECK_BUDGET_S
# (default 440 s; dry run 150 s) and `timeout` kills it 20 s after that whatever
# happens, so the call ends before 8 minutes. Exit 0: every part ok or skipped;
# 3: some part failed (see the JSON); anything else: the driver itself died.
#
# Environment: PYTHON (the interpreter: default python3; on the dry run .venv's if
# there is one), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_SITE (where the wheels
# are installed, default /tmp/gpu_check_site), GPU_CHECK_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=${GPU_CHECK_DRY_RUN:-0}
extra=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done

if [ "$dry" = 1 ]; then
  budget=${GPU_CHECK_BUDGET_S:-150}
  default_py=python3
  [ -x .venv/bin/python ] && default_py=.venv/bin/python
  py=${PYTHON:-$default_py}
  extra+=(--dry-run)
else
  budget=${GPU_CHECK_BUDGET_S:-440}
  py=${PYTHON:-python3}
fi
out=${OUT:-}
if [ -z "$out" ]; then
  out=$(mktemp -d /tmp/gpu_check.XXXXXX) || exit 1
fi
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

echo "gpu_check: python $py, budget ${budget}s, results in $out" >&2
timeout -k 5 "$((${budget%.*} + 20))" "$py" benchmarks/gpu_check.py \
  --out "$out" --budget-s "$budget" \
  --wheels "${GPU_CHECK_WHEELS:-.whl}" \
  --site-dir "${GPU_CHECK_SITE:-/tmp/gpu_check_site}" \
  "${extra[@]}"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_check: the driver overran its budget and was killed; the JSON holds" \
    "the parts finished before that" >&2
fi
echo "gpu_check: exit $rc; $out/gpu_check.json" >&2
exit "$rc"
