"""SPA's gold report again, from a finished run's files, under other gold checkers.

The loop writes `iter_<i>/gold_report.json` with the checker its YAML names
(`preferences_little_data.py` uses `choice`: a sampled answer counts only if it
names one option). Free answers to question-only prompts rarely name one, so this
recomputes each iteration's report from the same pairs and noise flags with the
package's own `spa.gold.gold_report`, for every checker given (default `choice`,
which must reproduce the loop's counts, and `contains`: right when the answer
contains the correct option's text). Nothing is trained or scored.

    python benchmarks/quality/spa_gold_posthoc.py \\
        outputs/quality/preferences_little_data_seed20/seed0 --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COUNTS = ("pairs", "exactly_one", "both", "neither", "unknown")


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
            entry["summary"] = gold_summary(rep)
            loop = d / "gold_report.json"
            if loop.exists():
                old = json.loads(loop.read_text())
                if old.get("checker") == checker:
                    entry["matches_loop_report"] = all(old[k] == rep[k] for k in COUNTS)
            out[checker][str(i)] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work", type=Path, help="a seed's work folder (has data/, spa/)")
    p.add_argument("--checkers", nargs="+", default=["choice", "contains"])
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args()
    result = reports(args.work, args.checkers)
    print(f"| checker | iteration | {' | '.join(COUNTS)} | self-label accuracy |")
    print("|---" * (len(COUNTS) + 3) + "|")
    for checker, its in result.items():
        for i, e in its.items():
            acc = e["summary"].get("self_label_accuracy")
            cells = " | ".join(str(e[k]) for k in COUNTS)
            shown = "–" if acc is None else f"{acc:.1%}"
            print(f"| {checker} | {i} | {cells} | {shown} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
