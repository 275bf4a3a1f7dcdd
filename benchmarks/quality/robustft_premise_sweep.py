"""How many rows does RobustFT's cross-fitted expert need to beat the labels?

For each training-set size and seed: the `robustft_mc.py` split of the data (the same
fixed shuffle, test rows first, so the sizes are nested), `--noise` of the labels
flipped, and `prefalign robustft-premise` on every row with the best arm's experts
(option log-likelihood of the base model, and a LoRA cross-fitted on the noisy
labels). The table is each expert's accuracy against the gold beside the labels'.
Results are saved after every (size, seed); a rerun skips the finished ones.

    python benchmarks/quality/robustft_premise_sweep.py --sizes 200 400 572 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common
from robustft_mc_arms import DATA_CHOICES, data_name, make_split

NAME = "robustft_premise_sweep"
EXPERTS = {
    "gold_field": "gold",
    "expert_scoring": "loglik",
    "expert_training": "crossfit",
}


def run_one(work: Path, data: str, size: int, args, seed: int) -> dict:
    train, _ = make_split(data, size, args.n_test, args.noise, seed)
    folder = work / f"n{size}" / f"seed{seed}"
    data_path = folder / "train.jsonl"
    common.write_jsonl(data_path, train)
    cfg = common.base_cfg(folder / "out", seed)
    block = {**EXPERTS, **args.settings, "seed": seed}
    block["output_dir"] = str(folder / "denoised")
    cfg["prefalign"] = {"robustft": block}
    cfg["datasets"] = [
        {
            "path": str(data_path),
            "ds_type": "json",
            "split": "train",
            "type": "axolotl_prefalign.robustft",
        }
    ]
    yml = common.write_yaml(folder / "premise.yml", cfg)
    exe = Path(sys.executable).parent / "prefalign"
    seconds = common.run_cmd(
        [str(exe), "robustft-premise", str(yml), "--rows", str(size)],
        folder / "premise.log",
    )
    # `prefalign robustft-premise` writes <prefalign.robustft.output_dir>/premise.json
    premise = json.loads((folder / "denoised" / "premise.json").read_text())
    entry = premise["entries"][0]
    return {
        "size": size,
        "seed": seed,
        "seconds": round(seconds, 1),
        "labels": entry["labels"],
        "experts": entry["experts"],
        "premise_holds": entry["premise_holds"],
        "verdicts": entry["verdicts"],
    }


def table(result: dict) -> str:
    runs = result["runs"]
    experts = sorted({k for r in runs for k in r["experts"]})
    head = ["rows", "seed", "labels", *experts, "time (s)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r["size"], r["seed"])):
        cells = [str(r["size"]), str(r["seed"]), pct(r["labels"])]
        cells += [pct(r["experts"][k]) if k in r["experts"] else "-" for k in experts]
        out.append("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(out)


def pct(d: dict) -> str:
    return (
        f"{100 * d['correct'] / d['total']:.1f}% "
        f"[{100 * d['interval_low']:.0f}, {100 * d['interval_high']:.0f}]"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="sst2", choices=DATA_CHOICES)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 572])
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--settings",
        nargs="*",
        default=[],
        help="extra prefalign.robustft settings, key=value",
    )
    p.add_argument("--out", type=Path, default=Path("docs/quality"))
    p.add_argument("--work", type=Path, default=Path(f"outputs/quality/{NAME}"))
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    args.settings = common.parse_settings(args.settings)
    path = args.out / f"{NAME}_{args.data}_noise{round(100 * args.noise)}.json"
    settings = {
        "dataset": data_name(args.data),
        "noise": args.noise,
        "n_test": args.n_test,
        "experts": {**EXPERTS, **args.settings},
    }
    result = {"experiment": NAME, "settings": settings, "runs": []}
    if path.exists():
        old = json.loads(path.read_text())
        if old["settings"] != settings:
            raise SystemExit(f"{path} has other settings; use another --out")
        result = old
    done = {(r["size"], r["seed"]) for r in result["runs"]}
    if not args.render:
        for size in args.sizes:
            for seed in args.seeds:
                if (size, seed) in done:
                    continue
                t0 = time.time()
                result["runs"].append(run_one(args.work, args.data, size, args, seed))
                print(f"n={size} seed={seed}: {time.time() - t0:.0f} s", flush=True)
                result["command"] = " ".join(sys.argv)
                common.write_outputs(  # no plot: the table is the result
                    result, args.out, path.stem, table(result) + "\n", lambda p: None
                )
    print(table(result))


if __name__ == "__main__":
    main()
