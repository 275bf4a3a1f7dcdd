#!/usr/bin/env bash
# A separate Python environment with TRL 1.16.0, for the TRL arm of
# benchmarks/dpo_step.py (TRL's own DPOTrainer next to ours) and its smoke test.
# It never touches the project's venv: it borrows that venv's CPU torch (and whatever
# else already satisfies TRL 1.16's requirements) through a .pth file, and pip
# installs into this env's own site-packages only what TRL 1.16 needs beyond that.
# A constraint pins torch to the borrowed build, so pip never pulls a CUDA torch.
#   bash tests/trl_env.sh [ENV_DIR]        # default .venv-trl116 (needs PyPI)
# Then: python benchmarks/dpo_step.py --configs prefalign trl116
#       pytest tests/test_dpo_step_trl.py   (skips without ENV_DIR)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ENV_DIR="${1:-$REPO/.venv-trl116}"
MAIN_PY="${MAIN_PY:-$REPO/.venv/bin/python}"
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
MAIN_SITE="$("$MAIN_PY" -c 'import site; print(site.getsitepackages()[0])')"
TORCH="$("$MAIN_PY" -c 'import torch; print(torch.__version__.split("+")[0])')"

"$BASE_PY" -m venv "$ENV_DIR"
SITE="$("$ENV_DIR/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# Last on sys.path: anything pip installs here wins over the project's versions.
echo "$MAIN_SITE" > "$SITE/zz_prefalign_main_venv.pth"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"
# TRL 1.16.0 with its declared ranges (transformers>=4.56.2, accelerate>=1.10.1,
# datasets>=4.7.0, peft>=0.13.0 for the [peft] extra); pip resolves them against the
# borrowed packages and installs here only what falls outside a range. Conflicts
# pip would report are the borrowed Axolotl's own pins (trl==1.9.0), not used here.
"$ENV_DIR/bin/pip" install -q --no-warn-conflicts -c "$CONSTRAINTS" "trl[peft]==1.16.0"
"$ENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import trl
from trl import DPOConfig, DPOTrainer  # noqa: F401  (the arm's imports)

assert trl.__version__ == "1.16.0", trl.__version__
assert not torch.version.cuda, f"a CUDA torch was pulled: {torch.__version__}"
where = {p: md.version(p) for p in ("torch", "transformers", "peft", "datasets", "accelerate")}
print("TRL", trl.__version__, "with", where, "ready in", __import__("sys").prefix)
PY
