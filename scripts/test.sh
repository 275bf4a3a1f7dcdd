#!/usr/bin/env bash
# Set up, then run the test suite (fast + slow CPU end-to-end; never GPU-only).
#   bash scripts/test.sh [pytest args]
# SKIP_SETUP=1 runs the tests in an environment set up before (CI sets up once, then
# runs several suites side by side); SKIP_LINT=1 leaves out ruff.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh || exit 1
VENV=${VENV-.venv}
# shellcheck disable=SC1091
[ -z "$VENV" ] || . "$VENV/bin/activate"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -z "${SKIP_LINT:-}" ]; then
  ruff check . && ruff format --check . || { echo "test.sh: ruff failed" >&2; exit 1; }
fi
python -m pytest -m "not gpu" -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  # pytest's 5 means no test ran: for this suite that is a broken selection, not
  # a pass.
  echo "test.sh: pytest collected no tests (exit 5); treating as a failure" >&2
  exit 1
fi
exit "$rc"
