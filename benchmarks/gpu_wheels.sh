#!/usr/bin/env bash
# The wheels that the GPU run (benchmarks/gpu_check.sh) imports and the GPU machine's
# image lacks, for CPython 3.12 on manylinux x86-64, downloaded into DEST; fails if
# they are more than the device tool may carry (docs/gpu.md).
#
#   bash benchmarks/gpu_wheels.sh .whl      # .whl is git-ignored: carry it
#
# Exit 0: DEST holds exactly these wheels and they fit; 1: usage or download
# failure; 2: over the size limit.
#
# Environment:
#   GPU_WHEELS_LIMIT_MIB    limit for the wheels alone (default 64)
#   GPU_WHEELS_TREE_CHECK   1 (default): also fail if wheels + the working tree that
#                           travels with every call exceed 64 MiB; 0: skip that
#   GPU_WHEELS_NO_DOWNLOAD  1: download nothing, only check the wheels in DEST
#   PIP                     the pip command (default: .venv's python -m pip)
set -uo pipefail
cd "$(dirname "$0")/.."

# name==version  why the GPU run needs it (the image has torch, transformers, peft,
# accelerate, triton, pyarrow, pandas, xxhash, fsspec, jinja2, rich, ...).
WHEELS=(
  bitsandbytes==0.50.2       # NF4 Linear4bit: the QLoRA base (CUDA 13.0 .so inside)
  pydantic==2.12.5           # axolotl_prefalign.core.config (PrefAlignConfig)
  pydantic-core==2.41.5      #   pydantic
  annotated-types==0.8.0     #   pydantic
  typing-inspection==0.4.5   #   pydantic
  typing-extensions==4.15.0  #   pydantic-core needs >= 4.14.1
  trl==1.9.0                 # the stock loss: TRL's DPOTrainer._compute_loss
  datasets==4.8.4            #   imported by trl.trainer.dpo_trainer
  dill==0.4.1                #   datasets
  multiprocess==0.70.19      #   datasets
  cut-cross-entropy==25.1.1  # part 4 (optional): CCE against the fused path
)

dest=${1:-}
if [ -z "$dest" ] || [ "$#" -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_wheels.sh DEST" >&2
  exit 1
fi
limit_mib=${GPU_WHEELS_LIMIT_MIB:-64}
mkdir -p "$dest" || exit 1

if [ "${GPU_WHEELS_NO_DOWNLOAD:-0}" != 1 ]; then
  if [ -n "${PIP:-}" ]; then
    read -r -a pip <<<"$PIP"
  elif [ -x .venv/bin/python ]; then
    pip=(.venv/bin/python -m pip)
  else
    pip=(python3 -m pip)
  fi
  tmp=$(mktemp -d) || exit 1
  trap 'rm -rf "$tmp"' EXIT
  names=()
  for w in "${WHEELS[@]}"; do names+=("${w%%#*}"); done
  if ! "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -q -d "$tmp" "${names[@]}"; then
    echo "gpu_wheels: pip download failed" >&2
    exit 1
  fi
  # Exactly these wheels: two versions of one package stop the install there.
  rm -f "$dest"/*.whl
  mv "$tmp"/*.whl "$dest"/ || exit 1
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }

shopt -s nullglob
files=("$dest"/*.whl)
if [ "${#files[@]}" -eq 0 ]; then
  echo "gpu_wheels: no wheels in $dest" >&2
  exit 1
fi
total=0
for f in "${files[@]}"; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  printf '%10s MiB  %s\n' "$(mib "$size")" "$(basename "$f")"
done
printf '%10s MiB  total (%d wheels), limit %s MiB\n' \
  "$(mib "$total")" "${#files[@]}" "$limit_mib"
limit=$(awk -v m="$limit_mib" 'BEGIN { printf "%d", m * 1048576 }')
if [ "$total" -gt "$limit" ]; then
  echo "gpu_wheels: the wheels exceed ${limit_mib} MiB: carry fewer" >&2
  exit 2
fi

if [ "${GPU_WHEELS_TREE_CHECK:-1}" = 1 ] && git rev-parse --is-inside-work-tree \
  >/dev/null 2>&1; then
  # What travels with every call: tracked and untracked-not-ignored files (not
  # DEST's wheels, counted above, should DEST be an untracked folder here).
  dest_abs=$(cd "$dest" && pwd -P)
  repo_abs=$(pwd -P)
  tree=0
  while IFS= read -r -d '' f; do
    case "$repo_abs/$f" in "$dest_abs"/*) continue ;; esac
    [ -f "$f" ] && tree=$((tree + $(stat -c %s "$f")))
  done < <(git ls-files -z --cached --others --exclude-standard)
  printf '%10s MiB  working tree that travels; with the wheels %s of 64 MiB\n' \
    "$(mib "$tree")" "$(mib $((tree + total)))"
  if [ $((tree + total)) -gt $((64 * 1048576)) ]; then
    echo "gpu_wheels: wheels + working tree exceed the 64 MiB a call may carry" >&2
    exit 2
  fi
fi
