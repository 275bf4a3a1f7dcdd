"""Check SPA's premise on your own prompts before the loop (`prefalign spa-premise`).

SPA trains on pairs its model labels itself (chosen = the answer with the higher
implicit reward, docs/methods.md#spa). That helps only when those self-labels are
right well above chance. On a sample of the prompts that have gold answers,
`check_premise` runs one expansion exactly as the loop does (`expand_iteration`:
sample K answers, judge them with β·[log π(y|x) − log π_init(y|x)]), scores the
judged pairs against the gold (`write_gold_report`), and returns the judge's
accuracy with its 95% interval and a verdict. Nothing is trained.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.accuracy import Accuracy, binomial_accuracy
from ..core.config import prefalign_config
from ..core.shards import atomic_write_json
from .errors import SpaLoopError
from .layout import has_weights, iter_dir
from .loop import expand_iteration, iteration_prompts, policy_spec
from .report import write_gold_report

PREMISE_DIR = "spa_premise"  # under output_dir: the sample's expansion, gold report
PREMISE_FILE = "spa_premise.json"  # under output_dir: the result
CHANCE = 0.5
# A judge right on 65% of the pairs gold can check is a useful bar: near 50% the
# self-labels are coin flips and the loop trains on noise.
USEFUL_BAR = 0.65


def gold_sample(parts: Sequence[Any], n: int, seed: int) -> tuple[Any, int]:
    """(`n` prompts with a gold answer drawn with `seed` from every iteration's
    prompts, how many had one). The sample is indexed 0..n−1 (two sources may
    share row numbers); `source_row` and `iteration` say where each came from."""
    from datasets import Dataset

    rows = [
        {**row, "source_row": row["index"], "iteration": i}
        for i, part in enumerate(parts, 1)
        if "gold" in part.column_names
        for row in part.to_list()
        if row["gold"] is not None
    ]
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    sample = [{**rows[k], "index": pos} for pos, k in enumerate(picked)]
    return Dataset.from_list(sample), len(rows)


def check_judge_model(cfg: Any, model_path: str | None, config: str) -> None:
    """Stop when no model is given and the loop's seed DPO has not run."""
    if model_path:
        return
    seed = iter_dir(cfg.get("output_dir"), 0)
    if has_weights(seed) or (seed / "adapter_config.json").exists():
        return
    raise SpaLoopError(
        f"no model to judge with: {seed} holds no seed DPO output; pass --model "
        "PATH (a model folder or LoRA adapter: the seed-DPO model whose implicit "
        f"reward would label the pairs), or run `prefalign spa {config}` until its "
        "seed DPO (iter_0) is saved"
    )


def verdict(judge: Accuracy) -> tuple[bool, str]:
    """(holds, one line): the premise holds only when the interval's lower bound
    is above chance."""
    if not judge.total:
        return False, (
            "undecided: no judged pair had exactly one right answer, so gold could "
            "not check the judge; use more --samples, or check that gold_checker "
            "reads the answers (see the counts above)"
        )
    low = f"{100 * judge.low:.1f}%"
    if judge.low > CHANCE:
        line = f"premise holds: the interval's lower bound {low} is above chance"
        if judge.rate < USEFUL_BAR:
            line += f", but the accuracy is below the {USEFUL_BAR:.0%} bar"
        return True, line
    return False, (
        f"premise not shown: the interval's lower bound {low} is not above chance "
        f"({CHANCE:.0%}); the self-labels may be no better than coin flips here"
    )


def check_premise(
    cfg: Any,
    samples: int,
    load_tokenizer: Callable[[], Any],
    model_path: str | None = None,
    config: str = "CONFIG",
) -> dict[str, Any]:
    """Judge `samples` gold prompts as one expansion does; the judge's accuracy
    on the pairs gold can check, its interval and verdict (also written to
    `output_dir/spa_premise.json`)."""
    if samples < 1:
        raise SpaLoopError(f"--samples must be at least 1, got {samples}")
    pa = prefalign_config(cfg)
    spa = pa.spa
    if not spa.has_gold:
        raise SpaLoopError(
            f"{config}: no prefalign.spa.prompts source names gold_field; add "
            "gold_field: <the column of each prompt's correct answer> (and "
            "gold_options_field for multiple choice) to a prompt source"
        )
    sample, with_gold = gold_sample(
        iteration_prompts(spa, pa.on_bad_row), samples, spa.seed
    )
    if not with_gold:
        raise SpaLoopError(f"{config}: no prompt has a usable gold answer")
    check_judge_model(cfg, model_path, config)
    out = Path(cfg.get("output_dir")) / PREMISE_DIR
    shutil.rmtree(out, ignore_errors=True)  # a fresh check every run
    expansion = expand_iteration(cfg, 1, load_tokenizer, model_path, str(out), sample)
    report = write_gold_report(spa, 1, out, sample)
    labels = report["self_labels"]
    judge = binomial_accuracy(labels["correct"], labels["pairs"])
    holds, line = verdict(judge)
    spec = policy_spec(cfg, 1, model_path)
    result = {
        "method": "spa",
        "config": config,
        "model": spec.model_id,
        "reference": spec.init_id,
        "checker": spa.gold_checker,
        "prompts_with_gold": with_gold,
        "prompts_sampled": len(sample),
        "ties_dropped": expansion.get("ties_dropped"),
        **{k: report[k] for k in ("pairs", "exactly_one", "both", "neither")},
        "unknown": report["unknown"],
        "judge": judge.as_dict(),
        "chance": CHANCE,
        "useful_bar": USEFUL_BAR,
        "premise_holds": holds,
        "verdict": line,
        "gold_report": str(out / "gold_report.json"),
    }
    path = Path(cfg.get("output_dir")) / PREMISE_FILE
    atomic_write_json(path, result)
    result["file"] = str(path)
    return result


def format_premise(result: dict[str, Any]) -> str:
    """The result as the lines `prefalign spa-premise` prints."""
    judge = binomial_accuracy(result["judge"]["correct"], result["judge"]["total"])
    return "\n".join(
        [
            f"SPA premise check: {result['config']}",
            f"  judge            {result['model']}",
            f"  against          {result['reference']}",
            f"  prompts          {result['prompts_sampled']} sampled of "
            f"{result['prompts_with_gold']} with gold",
            f"  pairs            {result['pairs']}: exactly one right "
            f"{result['exactly_one']}, both {result['both']}, neither "
            f"{result['neither']}, unknown {result['unknown']}",
            f"  judge accuracy   {judge.text()} on the {judge.total} pairs gold "
            "can check",
            f"  chance           {CHANCE:.0%}",
            f"  verdict          {result['verdict']}",
            f"  note             SPA needs its judge well above chance; "
            f"{USEFUL_BAR:.0%} is a useful bar",
            f"  written          {result['file']}",
        ]
    )
