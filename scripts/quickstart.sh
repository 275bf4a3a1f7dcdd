#!/usr/bin/env bash
# Set up, then DPO-train the embedded SmolLM2-135M-Instruct with the plugin on the
# CPU (yaml_examples/quickstart-cpu.yml: the first 60 of the 80 bundled ARC-Easy
# pairs), then compare the base model with the trained adapter on the 20 pairs it
# did not train on, and print where the adapter and its model card are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV-.venv}
# shellcheck disable=SC1091
[ -z "$VENV" ] || . "$VENV/bin/activate"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
config=yaml_examples/quickstart-cpu.yml
axolotl train "$config"
out=$(python -c "import yaml; print(yaml.safe_load(open('$config'))['output_dir'])")
# Held-out preference accuracy: the fraction of pairs where the model gives the
# correct answer a higher log-probability than the distractor.
heldout=$(prefalign eval-pairs "$config" --split "train[60:]" | tail -n 1)
echo
echo "quickstart: done. LoRA adapter, model card (README.md) and training log in $(cd "$out" && pwd)"
ls "$out"
echo
echo "quickstart: $heldout"
