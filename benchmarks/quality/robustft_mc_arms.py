"""The arms of robustft_mc.py: the data and its noise, each denoise arm's settings
and YAML."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import common

ARMS = [
    "untrained",
    "sft_noisy",
    "robustft_paper",
    "robustft_best",
    "cleanlab_only",
    "sft_clean",
]
DENOISE_ARMS = ("robustft_paper", "robustft_best", "cleanlab_only")
LABELS = {
    "untrained": "untrained",
    "sft_noisy": "SFT noisy",
    "robustft_paper": "RobustFT paper",
    "robustft_best": "RobustFT best",
    "cleanlab_only": "cleanlab only",
    "sft_clean": "SFT clean",
}
# arms whose inputs do not depend on the noise rate (make_split picks the rows
# before it flips any label): reused across noise rates, as in robustft_noise.py
NOISE_FREE = ("untrained", "sft_clean")
SHARED_KEYS = ("dataset", "n_train", "n_test", "epochs", "lora")
# settings that must match for a rerun to keep an earlier run's finished arms
RESUME_KEYS = (*SHARED_KEYS, "noise", *DENOISE_ARMS)
# The paper's RobustFT (Luo et al. 2024): generated answers of the base model
# (plain + reasoning), agreement of all of them, entropy-ranked selection.
PAPER = {
    "expert_scoring": "generate",
    "expert_training": "none",
    "detection": "agreement",
    "selection": "entropy",
}
DEFAULT_BEST = [
    "expert_scoring=loglik",
    "expert_training=crossfit",
    "detection=agreement",
    "selection=quota",
]
MIN_OPTIONS = 4
MAX_NOISE = 0.75  # (k - 1) / k at k = 4: above it a wrong option can outnumber
# SST-2 as a two-option question (the one set here where SFT on clean labels gets
# far above chance at 135M): with two options a flip rate near 50% leaves the
# labels independent of the truth, so it runs only up to 40%
SST2 = "sst2"
SST2_MAX_NOISE = 0.4
DATA_CHOICES = [*common.MC_DATASETS, SST2]


def data_name(data: str) -> str:
    """The dataset's name in tables and settings."""
    return "SST-2 validation" if data == SST2 else common.MC_DATASETS[data][2]


def min_options(data: str) -> int:
    """Fewest options a question of `data` may have."""
    return 2 if data == SST2 else MIN_OPTIONS


def noise_problem(data: str, noise: float) -> str | None:
    """Why `noise` is refused for `data`, or None."""
    if data == SST2:
        if not 0.0 <= noise <= SST2_MAX_NOISE:
            return (
                f"--noise must be in [0, {SST2_MAX_NOISE}] with --data {SST2}: with "
                "two options a flip rate near 50% leaves the labels independent of "
                "the truth"
            )
        return None
    if not 0.0 <= noise < MAX_NOISE:
        return (
            f"--noise must be in [0, {MAX_NOISE}): above it a wrong option can be "
            f"the most common label of {MIN_OPTIONS}-option questions"
        )
    return None


def make_split(
    data: str, n_train: int, n_test: int, noise: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(noisy train rows with a `gold` column, test rows); a fixed data order."""
    rows = (
        common.sst2_rows()
        if data == SST2
        else common.mc_rows(data, min_options=MIN_OPTIONS)
    )
    # one option count (the usual one) for every row: the answer letters, quotas
    # and option-probability columns then mean the same thing on every row
    k = Counter(len(r["options"]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if len(r["options"]) == k]
    if n_train + n_test > len(rows):
        raise SystemExit(
            f"{data} has {len(rows)} questions with {k} options: fewer "
            f"than --n-train {n_train} + --n-test {n_test}"
        )
    random.Random(1234).shuffle(rows)  # the split is the same for every seed
    test, train = rows[:n_test], rows[n_test : n_test + n_train]
    return common.flip_labels(train, noise, seed), test


def denoise_settings(args: Any) -> dict[str, dict[str, Any]]:
    """The `prefalign.robustft` block of each denoise arm (without output_dir)."""
    shared = {
        "gold_field": "gold",
        "agreement": "all",
        "k": 3,
        "review": args.review,
        "select_ratio": 0.5,
        "max_new_tokens": args.max_new_tokens,
        "answer_max_new_tokens": 16,
        "batch_size": 8,
    }
    best = {**shared, **PAPER, **args.best}
    return {
        "robustft_paper": {**shared, **PAPER},
        "robustft_best": best,
        # the best arm's expert; its flags are the whole method (relabels unused)
        "cleanlab_only": {**best, "detection": "cleanlab"},
    }


def arm_block(arm: str, block: dict[str, Any], seed: int) -> tuple[dict, list[str]]:
    """(block for this seed and checkout, paper settings left out as it lacks them).

    The run's seed goes into `seed` (fold split and fold LoRAs) where it exists.

    The paper arm's options are the defaults of the pipeline (its behaviour before
    they became settings), so a checkout without them runs the paper arm unchanged;
    every other arm needs its settings (see `common.prefalign_problem`).
    """
    from axolotl_prefalign.core.config import RobustFTConfig

    fields = RobustFTConfig.model_fields
    if "seed" in fields or arm != "robustft_paper":
        block = {**block, "seed": seed}
    if arm != "robustft_paper":
        return block, []
    dropped = [k for k in PAPER if k not in fields]
    return {k: v for k, v in block.items() if k not in dropped}, dropped


# One output parent for every denoise arm of a seed: each arm's folder is keyed by
# its settings, and the arms with the same cross-fitting settings (RobustFT best,
# cleanlab only) share the cross-fitted folds cached there.
DENOISE_PARENT = "denoised"


def denoise_cfg(work: Path, arm: str, data: Path, block: dict, args, seed) -> dict:
    """The YAML of a denoise arm: `axolotl prefalign denoise`, then train on it."""
    return common.denoise_train_cfg(
        work, arm, data, block, args.epochs, seed, parent=work / DENOISE_PARENT
    )


def missing_package(block: dict[str, Any]) -> str | None:
    """What an arm's settings need that is not installed (cleanlab), or None."""
    import importlib.util

    if block.get("detection") == "cleanlab" and not importlib.util.find_spec(
        "cleanlab"
    ):
        return "the cleanlab package (detection: cleanlab; pip install 'cleanlab>=2.6')"
    return None
