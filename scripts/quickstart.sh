#!/usr/bin/env bash
# Set up, then DPO-train the embedded SmolLM2-135M-Instruct with the plugin on the
# CPU (yaml_examples/quickstart-cpu.yml) and print where the adapter is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV-.venv}
# shellcheck disable=SC1091
[ -z "$VENV" ] || . "$VENV/bin/activate"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
axolotl train yaml_examples/quickstart-cpu.yml
out=$(python -c "import yaml; print(yaml.safe_load(open('yaml_examples/quickstart-cpu.yml'))['output_dir'])")
echo
echo "quickstart: done. LoRA adapter and training log in $(cd "$out" && pwd)"
ls "$out"
