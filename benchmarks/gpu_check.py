"""The GPU numbers in one prepared, time-boxed run (`gpu_check.sh`).

Parts, each in its own subprocess with a timeout, each recorded in ONE JSON whether it
passes, fails, times out or is skipped (a failing part never stops the others):

    setup           the carried wheels into a --target dir, nvidia-smi, versions
    fused_vs_plain  core.logprobs.token_logprobs vs the plain full-logits path, bf16:
                    values and gradients w.r.t. hidden states and lm_head, both also
                    against an fp32 computation from the same bf16 inputs; time, memory
    dpo_step        QLoRA DPO step of a Llama-3-8B-shaped NF4 model, LoRA r=16,
                    2048 + 2048 tokens, under a 24 GiB cap: stock vs ours padded vs
                    ours packed, 2 warm-up + 3 timed steps each: peak GiB, tokens/s,
                    MFU (6·N)
    max_length      the longest length per side that fits under the cap (time-boxed,
                    in the same process right after each configuration's dpo_step)
    cce             cut-cross-entropy's per-token log-probs against ours (optional)

"stock" is TRL's own `DPOTrainer._compute_loss` (the loss Axolotl's `rl: dpo` runs:
full-vocabulary logits, fp32 log-softmax, gather, reference pass with the adapter
disabled, sigmoid loss), called on a trainer object that holds only what that method
reads; where TRL cannot be imported the stock rows say `skipped` and why. "ours" is
`core.preference.PreferenceStep`. Both run in the same plain loop, which does what
TRL + Axolotl's trainer do around the loss (see docs/gpu.md), on workload.py's model.

    python benchmarks/gpu_check.py --out DIR              # CUDA, the real shapes
    python benchmarks/gpu_check.py --out DIR --dry-run    # CPU, tiny shapes (CI)

This file is the entry point (driver and workers alike); the pieces live beside it:
gpu_check_driver.py (time-boxed workers, the JSON), gpu_check_settings.py (shapes,
time boxes, tolerance), gpu_check_machine.py (setup), gpu_check_logprobs.py
(fused_vs_plain, cce), gpu_check_dpo.py (dpo_step, max_length) with dpo_arms.py
(stock and ours), gpu_check_report.py (summaries, the table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from dpo_arms import (
    BETA,
    OneRankAccelerator,
    ours_loss,
    pair_batch,
    stock_loss,
    trl_args,
)
from gpu_check_dpo import _prepare, _train_step, dpo_config, worker_dpo
from gpu_check_driver import Driver
from gpu_check_logprobs import compare_logprobs, fused_fn, worker_cce, worker_fused
from gpu_check_machine import NEEDED_MODULES, PACKAGES, versions, worker_info
from gpu_check_records import emit
from gpu_check_settings import CONFIGS, PARTS, SETTINGS, TOLERANCE
from workload import REPO

# What other benchmarks and the tests import from here; each lives in the module
# that its import line names.
__all__ = [
    "BETA",
    "CONFIGS",
    "NEEDED_MODULES",
    "PACKAGES",
    "PARTS",
    "SETTINGS",
    "TOLERANCE",
    "Driver",
    "OneRankAccelerator",
    "_prepare",
    "_train_step",
    "compare_logprobs",
    "dpo_config",
    "emit",
    "fused_fn",
    "main",
    "ours_loss",
    "pair_batch",
    "parse_args",
    "stock_loss",
    "trl_args",
    "versions",
]


def worker_sleep(spec: dict) -> None:
    """For the tests of the time box: one record, then hang."""
    emit("sleep", {"status": "ok"})
    time.sleep(spec.get("seconds", 60))


# The workers the driver starts as `gpu_check.py --worker NAME SPEC`.
WORKERS = {
    "sleep": worker_sleep,
    "info": worker_info,
    "fused_vs_plain": worker_fused,
    "dpo": worker_dpo,
    "cce": worker_cce,
}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of the driver, and of a worker (--worker NAME SPEC)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run, seconds")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels")
    ap.add_argument(
        "--site-dir",
        default=os.path.join(tempfile.gettempdir(), "gpu_check_site"),
        help="where the wheels are installed (pip --target)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 150.0 if args.dry_run else 440.0
    if not args.worker and not args.out:
        ap.error("--out is required")
    return args


def main(argv=None) -> int:
    """One worker when --worker names it; otherwise the whole run."""
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec or "{}"))
        return 0
    return Driver(args).run()


if __name__ == "__main__":
    sys.exit(main())
