#!/usr/bin/env bash
# A separate Python environment with LLaMA-Factory 0.9.5 and this package (no deps: its
# Axolotl side is not imported there), for the LLaMA-Factory tests: the launcher
# (`prefalign llamafactory train`) and LLaMA-Factory's own loader on our exports.
# It never touches the project's venv: it borrows that venv's torch (CPU) through a .pth
# file and pins, in its own site-packages, the versions LLaMA-Factory 0.9.5 requires.
#   bash tests/llamafactory_env.sh [ENV_DIR]        # default /tmp/lf-venv (needs PyPI)
# Then: PREFALIGN_LLAMAFACTORY_PYTHON=ENV_DIR/bin/python pytest tests/test_llamafactory*.py
#       tests/test_export_llamafactory.py   (.ci/run builds it in .venv-lf)
set -euo pipefail
ENV_DIR="${1:-/tmp/lf-venv}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MAIN_PY="${MAIN_PY:-$REPO/.venv/bin/python}"
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
MAIN_SITE="$("$MAIN_PY" -c 'import site; print(site.getsitepackages()[0])')"

"$BASE_PY" -m venv "$ENV_DIR"
SITE="$("$ENV_DIR/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# Last on sys.path: this env's own pins win over the project's versions.
echo "$MAIN_SITE" > "$SITE/zz_prefalign_main_venv.pth"
"$ENV_DIR/bin/pip" install -q --no-deps \
    "llamafactory==0.9.5" "transformers==5.6.0" "trl==0.24.0" "peft==0.18.1" \
    "datasets==4.0.0" "accelerate==1.11.0" "tokenizers==0.22.2" "kernels>=0.12,<0.13"
"$ENV_DIR/bin/pip" install -q "omegaconf" "tyro<0.9.0"
# This package itself, editable, without its dependencies (they come from the
# project's venv or the pins above): `prefalign llamafactory ...` runs here.
"$ENV_DIR/bin/pip" install -q --no-deps -e "$REPO"
# LLaMA-Factory imports torchaudio at module level (audio inputs); no torchaudio build
# matches the project's CPU torch, and text data never calls it.
mkdir -p "$SITE/torchaudio"
echo '"""Stub: imported by LLaMA-Factory, unused for text data."""' > "$SITE/torchaudio/__init__.py"
DISABLE_VERSION_CHECK=1 "$ENV_DIR/bin/python" -c \
    "import llamafactory.data, llamafactory.hparams, llamafactory.model, axolotl_prefalign.integrations.llamafactory.trainer; print('LLaMA-Factory', llamafactory.__version__, 'ready in $ENV_DIR')"
