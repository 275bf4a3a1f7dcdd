"""SPA where a rule is the gold: measure the judge first, then compare the arms.

The preference is a format or length rule, so every answer can be checked: the
base model (SmolLM2-135M-Instruct) samples 4 answers per ARC-Easy question, and a
prompt whose samples both keep and break the rule gives a pair (chosen keeps it).
These are the model's own answers labelled by a rule, not a public preference set.

Stage 1, `--stage premise`, per candidate (`spa_rules_data.CANDIDATES`): seed DPO on
`--premise-size` pairs, then `prefalign spa-premise` on `--premise-samples` unlabelled
prompts: the judge's accuracy (implicit reward of the seed-DPO model) against the
rule on the pairs where exactly one answer keeps it.

Stage 2, `--stage compare --candidate C`, per seed size and seed:
  dpo_seed  iteration 0 of the SPA run (DPO on the seed pairs)
  spa       `axolotl prefalign spa`: the same seed DPO + 2 self-annotation
            iterations on `--spa-prompts` unlabelled prompts (gold report per iteration)
  sft       `axolotl train`: plain SFT on the seed's chosen answers
  dpo_all   DPO on every labelled pool pair (does not depend on the seed size)
Metrics on the held-out questions: rule satisfaction of the greedy answer, and
preference accuracy (the implicit reward log π(y|x) − log π_base(y|x) ranks the
chosen answer above the rejected one) on the held-out pairs.

Results are saved after every arm; a rerun with the same settings skips finished
arms (resume), and an SPA loop that was interrupted resumes where it stopped (its
`train_s` is then the resumed part's, marked `resumed`). Seeds can run side by side
in separate processes with the same `--out` (each `--seeds` of its own): each save
takes in the other processes' newest runs.

    python benchmarks/quality/spa_rules.py --stage premise
    python benchmarks/quality/spa_rules.py --stage compare --candidate max_words \
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import spa_rules_data as data_mod  # noqa: E402
from preferences_arms import dpo_cfg, spa_cfg  # noqa: E402
from spa_rules_report import compare_table, plot, premise_table  # noqa: E402

NAME = "spa_rules"
SETTING_KEYS = (
    "n_test", "n_pool", "samples", "max_new_tokens", "max_words", "epochs",
    "dpo_lr", "spa_prompts", "premise_size", "premise_samples",
)  # fmt: skip


def run_seed(key: str) -> int:
    """The seed of a run key ("<seed>/<size>" or "<seed>/all")."""
    return int(key.split("/")[0])


def write_sets(d: Path, sets) -> None:
    seed_pairs, all_pairs, spa_prompts, test_pairs, _ = sets
    common.write_jsonl(d / "seed.jsonl", seed_pairs)
    common.write_jsonl(d / "all.jsonl", all_pairs)
    common.write_jsonl(d / "prompts.jsonl", spa_prompts)
    common.write_jsonl(
        d / "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": p["chosen"]},
                ]
            }
            for p in seed_pairs
        ],
    )
    common.write_jsonl(d / "test_pairs.jsonl", test_pairs)


def rule_spa_cfg(work: Path, d: Path, n_prompts: int, args, seed: int) -> dict:
    """The SPA YAML with the rule as gold (gold_checker: rule)."""
    cfg = spa_cfg(work, d / "seed.jsonl", d / "prompts.jsonl", n_prompts, args, seed)
    spa = cfg["prefalign"]["spa"]
    spa["prompts"] = [{"path": str(d / "prompts.jsonl"), "gold_field": "gold"}]
    spa["gold_checker"] = "rule"
    spa["generation_batch_size"] = 32
    spa["judge_batch_size"] = 16
    return cfg


def load_policy(path: Path | None):
    """(model, tokenizer): the base, a LoRA adapter on it, or a full model folder."""
    if path is None or (path / "adapter_config.json").exists():
        return common.load_model(path)
    import torch
    from transformers import AutoModelForCausalLM

    _, tok = common.load_model(None)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), tok


_REF: dict[tuple[str, str, str], tuple[float, float]] = {}


def evaluate(path: Path | None, rule: str, prompts, pairs, args) -> dict:
    """Rule satisfaction of greedy answers, and preference accuracy on the pairs."""
    from axolotl_prefalign.robustft.sft import render_example
    from axolotl_prefalign.spa.gold import keeps_rule

    model, tok = load_policy(path)
    answers = data_mod.generate(
        model, tok, prompts, samples=1, max_new_tokens=args.max_new_tokens,
        temperature=None, seed=0, desc="greedy answers",
    )  # fmt: skip
    kept = [keeps_rule(a[0], rule) for a in answers]
    out: dict[str, Any] = {
        "rule_satisfaction": sum(kept) / len(kept),
        "mean_words": sum(len(a[0].split()) for a in answers) / len(answers),
        "examples": [a[0] for a in answers[:3]],
    }
    if path is None:
        out["preference_accuracy"] = None
        return out
    ref = None
    right = 0
    for p in pairs:
        head, c = render_example(tok, p["prompt"], p["chosen"])
        _, r = render_example(tok, p["prompt"], p["rejected"])
        key = (head, c, r)
        if key not in _REF:
            ref = ref or common.load_model(None)[0]
            _REF[key] = tuple(common.reply_logprobs(ref, tok, head, [c, r]))
        lc, lr = common.reply_logprobs(model, tok, head, [c, r])
        right += (lc - _REF[key][0]) > (lr - _REF[key][1])
    out["preference_accuracy"] = right / len(pairs)
    return out


def run_premise(args, result: dict) -> None:
    """Seed DPO + `prefalign spa-premise` for each candidate."""
    ax = common.axolotl_bin()
    pre = Path(sys.executable).parent / "prefalign"
    for cand in args.candidates:
        rec = result["premise"].setdefault(cand, {})
        if "judge" in rec:
            continue
        t0 = time.time()
        samples = data_mod.base_samples(args, cand, args.work)
        rec["sampling_s"] = round(time.time() - t0, 1)
        rec["rule"] = samples["rule"]
        rec["base_samples"] = data_mod.sample_stats(samples)
        work = args.work / cand / "premise"
        sets = data_mod.make_sets(samples, 0, args.premise_size, args.premise_samples)
        write_sets(work / "data", sets)
        seed_file = work / "data" / "seed.jsonl"
        cfg = dpo_cfg(work, "dpo", seed_file, args, 0)
        y = common.write_yaml(work / "dpo.yml", cfg)
        rec["dpo_s"] = round(common.run_cmd([ax, "train", str(y)], work / "dpo.log"), 1)
        cfg = rule_spa_cfg(work, work / "data", args.premise_samples, args, 0)
        y = common.write_yaml(work / "spa.yml", cfg)
        cmd = [str(pre), "spa-premise", str(y), "--model", str(work / "dpo"),
               "--samples", str(args.premise_samples)]  # fmt: skip
        rec["premise_s"] = round(common.run_cmd(cmd, work / "premise.log"), 1)
        found = json.loads((work / "spa" / "spa_premise.json").read_text())
        rec.update({k: found[k] for k in ("judge", "premise_holds", "verdict")})
        rec.update({k: found[k] for k in ("pairs", "exactly_one", "both", "neither")})
        print(f"premise {cand}: {found['verdict']}", flush=True)
        args.save()


def run_compare(args, result: dict) -> None:
    """Every arm for each seed size and seed, saved arm by arm."""
    ax = common.axolotl_bin()
    samples = data_mod.base_samples(args, args.candidate, args.work)
    rule = samples["rule"]
    result["rule"], result["base_samples"] = rule, data_mod.sample_stats(samples)
    runs = result["runs"]
    for seed in args.seeds:
        for size in args.seed_sizes:
            sets = data_mod.make_sets(samples, seed, size, args.spa_prompts)
            _, all_pairs, _, test_pairs, test_prompts = sets
            work = args.work / args.candidate / f"seed{seed}" / f"n{size}"
            write_sets(work / "data", sets)
            rec = runs.setdefault(f"{seed}/{size}", {"seed": seed, "size": size})
            arms = rec.setdefault("arms", {})

            def score(
                arm: str, path: Path | None, arms=arms, seed=seed, size=size,
                test=(test_prompts, test_pairs), **extra,
            ) -> None:  # fmt: skip
                test_prompts, test_pairs = test
                t0 = time.time()
                arms[arm] = evaluate(path, rule, test_prompts, test_pairs, args)
                arms[arm].update(extra, eval_s=round(time.time() - t0, 1))
                print(f"seed {seed} n{size} {arm}: "
                      f"{json.dumps(arms[arm])[:200]}", flush=True)  # fmt: skip
                args.save()

            if "untrained" not in arms:
                score("untrained", None)
            if "spa" not in arms:
                cfg = rule_spa_cfg(work, work / "data", args.spa_prompts, args, seed)
                y = common.write_yaml(work / "spa.yml", cfg)
                cmd = [ax, "prefalign", "spa", str(y)]
                # a loop that resumes an interrupted one: its time is this part only
                resumed = (work / "spa").exists()
                secs = common.run_cmd(cmd, work / "spa.log")
                reports = {
                    i: json.loads((work / "spa" / f"iter_{i}" / "gold_report.json")
                                  .read_text())["self_labels"]
                    for i in (1, 2)
                }  # fmt: skip
                score("dpo_seed", work / "spa" / "iter_0")
                score("spa", work / "spa" / "iter_2" / "merged", train_s=round(secs, 1),
                      resumed=resumed, self_labels=reports)  # fmt: skip
            if "sft" not in arms:
                cfg = common.sft_cfg(work, "sft", work / "data" / "sft.jsonl",
                                     args.epochs, seed)  # fmt: skip
                y = common.write_yaml(work / "sft.yml", cfg)
                secs = common.run_cmd([ax, "train", str(y)], work / "sft.log")
                score("sft", work / "sft", train_s=round(secs, 1))
            shared = runs.setdefault(f"{seed}/all", {"seed": seed, "arms": {}})
            if "dpo_all" not in shared["arms"]:
                arms_all = shared["arms"]
                d = args.work / args.candidate / f"seed{seed}" / "all"
                y = common.write_yaml(d / "dpo_all.yml",
                                      dpo_cfg(d, "dpo_all", work / "data" / "all.jsonl",
                                              args, seed))  # fmt: skip
                secs = common.run_cmd([ax, "train", str(y)], d / "dpo_all.log")
                t0 = time.time()
                arms_all["dpo_all"] = evaluate(d / "dpo_all", rule, test_prompts,
                                               test_pairs, args)  # fmt: skip
                arms_all["dpo_all"].update(
                    pairs=len(all_pairs), train_s=round(secs, 1),
                    eval_s=round(time.time() - t0, 1),
                )  # fmt: skip
                args.save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["premise", "compare"], required=True)
    p.add_argument("--candidates", nargs="+", default=list(data_mod.CANDIDATES))
    p.add_argument("--candidate", choices=list(data_mod.CANDIDATES))
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--n-pool", type=int, default=240)
    p.add_argument("--samples", type=int, default=4, help="base samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dpo-lr", type=float, default=1e-4)
    p.add_argument("--spa-prompts", type=int, default=64, help="over 2 iterations")
    p.add_argument("--premise-size", type=int, default=32)
    p.add_argument("--premise-samples", type=int, default=48)
    p.add_argument("--seed-sizes", type=int, nargs="+", default=[16, 48])
    common.add_run_args(p)
    args = p.parse_args()
    args.work = args.work / NAME
    settings = {k: getattr(args, k) for k in SETTING_KEYS}
    name = NAME + ("_premise" if args.stage == "premise" else f"_{args.candidate}")
    path = args.out / f"{name}.json"
    result: dict[str, Any] = {"experiment": name, "settings": settings,
                              "premise": {}, "runs": {}}  # fmt: skip
    if path.exists():
        old = json.loads(path.read_text())
        if old["settings"] != settings:
            raise SystemExit(f"{path} was run with other settings; use another --out")
        result = old
    table = premise_table if args.stage == "premise" else compare_table

    def save() -> None:
        result["command"] = " ".join(sys.argv)
        if args.stage == "compare":  # seeds may run side by side, same --out
            common.merge_other_seeds(result, path, SETTING_KEYS, args.seeds, run_seed)
        common.write_outputs(result, args.out, name, table(result),
                             lambda p: plot(result, p))  # fmt: skip

    args.save = save
    if not args.render:
        if args.stage == "premise":
            run_premise(args, result)
        else:
            if not args.candidate:
                raise SystemExit("--stage compare needs --candidate")
            run_compare(args, result)
    save()
    print(table(result))


if __name__ == "__main__":
    main()
