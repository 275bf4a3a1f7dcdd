"""SPA's gold report again, from a finished run's files, under other gold checkers.

The loop writes `iter_<i>/gold_report.json` with the checker its YAML names
(`preferences_little_data.py` uses `choice`: a sampled answer counts only if it
names one option). Free answers to question-only prompts rarely name one, so this
recomputes each iteration's report from the same pairs and noise flags with the
package's own `spa.gold.gold_report`, for every checker given (default `choice`,
which must reproduce the loop's counts, and `contains`: right when the answer
contains the correct option's text). Nothing is trained or scored.

Given several seeds' folders it also pools them: per checker and iteration, the
summed counts of pairs with exactly one right sample, self-labels right and noise
flags, and the accuracy / precision / recall of the sums. A seed run has only a few
exactly-one pairs, so a mean of per-seed percentages would weigh 1 pair like 10.

    python benchmarks/quality/spa_gold_posthoc.py \\
        outputs/quality/preferences_little_data_seed20/seed0 --out /tmp/g.json
    python benchmarks/quality/spa_gold_posthoc.py \\
        outputs/quality/preferences_little_data_seed20/seed* --out /tmp/g.json
    # add a new seed to an earlier result whose work folders are gone
    python benchmarks/quality/spa_gold_posthoc.py \\
        outputs/quality/preferences_little_data_seed20/seed2 \\
        --merge docs/quality/spa_gold_posthoc.json --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from axolotl_prefalign.spa.gold import FLAG_KINDS
from axolotl_prefalign.spa.gold import REPORT_COUNTS as COUNTS


def reports(work: Path, checkers: list[str], iterations: int = 2) -> dict[str, Any]:
    """{checker: {iteration: {counts..., summary}}} for one seed's work folder
    (`data/prompts.jsonl` and `spa/iter_<i>/`)."""
    from axolotl_prefalign.core.config import SpaPromptSource
    from axolotl_prefalign.core.shards import read_shards
    from axolotl_prefalign.spa.gold import (
        FLAGS_FILE,
        gold_report,
        gold_summary,
        read_flags,
    )
    from axolotl_prefalign.spa.loop import load_prompts

    # the prompt source as preferences_little_data.py gives it to the loop
    source = SpaPromptSource(
        path=str(work / "data" / "prompts.jsonl"),
        gold_field="gold",
        gold_options_field="options",
    )
    out: dict[str, Any] = {}
    for checker in checkers:
        # the loop's own reading: source positions as `index`, gold per checker
        rows = load_prompts(source, gold_checker=checker).to_list()
        out[checker] = {}
        for i in range(1, iterations + 1):
            d = work / "spa" / f"iter_{i}"
            if not (d / "pairs").exists():
                continue
            flags = read_flags(d / FLAGS_FILE) or None
            rep = gold_report(rows, read_shards(d / "pairs"), checker, flags, i)
            entry = {k: rep[k] for k in COUNTS}
            entry["self_labels"] = rep["self_labels"]
            entry["noise_flags"] = {k: rep["noise_flags"].get(k) for k in FLAG_KINDS}
            entry["summary"] = gold_summary(rep)
            loop = d / "gold_report.json"
            if loop.exists():
                old = json.loads(loop.read_text())
                if old.get("checker") == checker:
                    entry["matches_loop_report"] = all(old[k] == rep[k] for k in COUNTS)
            out[checker][str(i)] = entry
    return out


def pool(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{checker: {iteration: the seeds' reports pooled}} (`spa.gold.pool_reports`:
    summed counts, rates of the sums) over `reports` results ({folder: result})."""
    from axolotl_prefalign.spa.gold import pool_reports

    grouped: dict[str, dict[str, list]] = {}
    for result in per_seed.values():
        for checker, its in result.items():
            for i, entry in its.items():
                grouped.setdefault(checker, {}).setdefault(i, []).append(entry)
    return {
        checker: {i: pool_reports(entries) for i, entries in its.items()}
        for checker, its in grouped.items()
    }


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def pooled_table(pooled: dict[str, Any]) -> list[str]:
    """Markdown rows of `pool`'s sums."""
    lines = [
        "| checker | iteration | runs | pairs | exactly one right | self-labels right "
        "| flags precision / recall (DND) | flags precision / recall (no DND) |",
        "|---" * 8 + "|",
    ]
    for checker, its in pooled.items():
        for i, a in its.items():
            sl = a["self_labels"]
            flags = []
            for kind in FLAG_KINDS:
                f = a["noise_flags"][kind]
                flags.append(
                    "–"
                    if f is None
                    else f"{f['flagged_wrong']}/{f['flagged']} = "
                    f"{_pct(f['precision'])} / "
                    f"{f['flagged_wrong']}/{f['wrong']} = {_pct(f['recall'])}"
                )
            lines.append(
                f"| {checker} | {i} | {a['runs']} | {a['pairs']} | {a['exactly_one']} "
                f"| {sl['correct']}/{sl['pairs']} = {_pct(sl['accuracy'])} "
                f"| {flags[0]} | {flags[1]} |"
            )
    return lines


def merged(
    earlier: Path | None, per_seed: dict[str, dict[str, Any]], checkers: list[str]
) -> dict[str, dict[str, Any]]:
    """`per_seed` over an earlier `--out` JSON's folders (whose work folders may be
    gone), each folder's reports for `checkers` only: its entries are kept, a folder
    given again is recomputed. The earlier result must hold every checker asked for."""
    if earlier is None:
        return per_seed
    try:
        old = json.loads(earlier.read_text())["per_seed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{earlier}: not a spa_gold_posthoc result ({e})") from e
    for folder, result in old.items():
        missing = [c for c in checkers if c not in result]
        if missing and folder not in per_seed:
            raise SystemExit(
                f"{earlier}: {folder} has no {', '.join(missing)} report; "
                "rerun it from its work folder"
            )
    every = {**old, **per_seed}
    return {w: {c: every[w][c] for c in checkers} for w in every}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "work", type=Path, nargs="*", help="seed work folders (each has data/, spa/)"
    )
    p.add_argument("--checkers", nargs="+", default=["choice", "contains"])
    p.add_argument(
        "--merge",
        type=Path,
        help="an earlier --out JSON: pool its folders' reports with these",
    )
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args()
    if not args.work and args.merge is None:
        p.error("give seed work folders, --merge, or both")
    per_seed = {str(w): reports(w, args.checkers) for w in args.work}
    per_seed = merged(args.merge, per_seed, args.checkers)
    head = " | ".join(COUNTS)
    print(f"| folder | checker | iteration | {head} | self-label accuracy |")
    print("|---" * (len(COUNTS) + 4) + "|")
    for work, result in per_seed.items():
        for checker, its in result.items():
            for i, e in its.items():
                cells = " | ".join(str(e[k]) for k in COUNTS)
                shown = _pct(e["summary"].get("self_label_accuracy"))
                print(f"| {work} | {checker} | {i} | {cells} | {shown} |")
    pooled = pool(per_seed)
    if len(per_seed) > 1:
        print("\nPooled over the folders:\n")
        print("\n".join(pooled_table(pooled)))
    if args.out:
        out = {"per_seed": per_seed, "pooled": pooled}
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
