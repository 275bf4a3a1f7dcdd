"""spa_rules.py and robustft_premise_sweep.py: the pairs a rule labels, the sets
each arm reads, and the tables (the training runs through the real commands)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(QUALITY))
    try:
        yield SimpleNamespace(
            data=importlib.import_module("spa_rules_data"),
            report=importlib.import_module("spa_rules_report"),
            sweep=importlib.import_module("robustft_premise_sweep"),
        )
    finally:
        sys.path.remove(str(QUALITY))


LONG = "one two three four five six"
SHORT = "one two"


def _samples(n_pool=10):
    """Prompt k's samples: pool prompts 0, 2, 4, ... have a short and a long one."""
    pool = [
        {"prompt": f"q{k}", "samples": [LONG, SHORT] if k % 2 == 0 else [LONG, LONG]}
        for k in range(n_pool)
    ]
    test = [
        {"prompt": "t0", "samples": [SHORT, LONG]},
        {"prompt": "t1", "samples": [SHORT]},
    ]
    return {"rule": "max_words: 3", "pool": pool, "test": test}


def test_a_pair_needs_a_sample_on_each_side_of_the_rule(mods):
    assert mods.data.rule_pair(
        {"prompt": "q", "samples": [LONG, SHORT, LONG]}, "max_words: 3"
    ) == {
        "prompt": "q",
        "chosen": SHORT,
        "rejected": LONG,
    }
    assert (
        mods.data.rule_pair({"prompt": "q", "samples": [LONG, LONG]}, "max_words: 3")
        is None
    )
    answer = {"prompt": "q", "samples": ["B is right", "Because.\nAnswer: B"]}
    pair = mods.data.rule_pair(answer, "answer_line")
    assert (pair["chosen"], pair["rejected"]) == ("Because.\nAnswer: B", "B is right")


def test_sets_keep_the_seed_out_of_the_spa_prompts(mods):
    data = _samples()
    seed_pairs, all_pairs, spa, test_pairs, test_prompts = mods.data.make_sets(
        data, seed=3, seed_size=2, spa_prompts=6
    )
    assert len(all_pairs) == 5 and len(seed_pairs) == 2
    assert all(p["chosen"] == SHORT and p["rejected"] == LONG for p in all_pairs)
    seen = {p["prompt"] for p in seed_pairs}
    assert len(spa) == 6 and not seen & {p["prompt"] for p in spa}
    assert all(p["gold"] == "max_words: 3" for p in spa)
    assert [p["prompt"] for p in test_pairs] == ["t0"] and test_prompts == ["t0", "t1"]
    # a larger seed starts with the smaller one (same seed): nested sizes
    bigger = mods.data.make_sets(data, seed=3, seed_size=4, spa_prompts=6)[0]
    assert bigger[:2] == seed_pairs
    with pytest.raises(SystemExit, match="seed size 6 > 5 labelled pairs"):
        mods.data.make_sets(data, seed=3, seed_size=6, spa_prompts=6)


def test_sample_stats_count_rule_keepers_and_pairs(mods):
    stats = mods.data.sample_stats(_samples())
    assert stats["pool"] == {
        "prompts": 10,
        "samples": 20,
        "samples_keeping_rule": 5,
        "prompts_with_pair": 5,
    }
    assert stats["test"]["prompts_with_pair"] == 1


def _arm(rule, pref, **extra):
    return {"rule_satisfaction": rule, "preference_accuracy": pref, **extra}


def test_compare_table_means_and_per_seed_differences(mods):
    labels = {"1": {"accuracy": 0.75, "correct": 3, "pairs": 4}}
    labels["2"] = {"accuracy": 0.5, "correct": 1, "pairs": 2}
    runs = {}
    for seed, (dpo, spa) in enumerate([(0.2, 0.3), (0.4, 0.4), (0.3, 0.5)]):
        runs[f"{seed}/16"] = {
            "seed": seed,
            "size": 16,
            "arms": {
                "dpo_seed": _arm(dpo, 0.6),
                "spa": _arm(spa, 0.7, self_labels=labels, train_s=100, eval_s=10),
            },
        }
        runs[f"{seed}/all"] = {"seed": seed, "arms": {"dpo_all": _arm(0.9, 0.8)}}
    md = mods.report.compare_table({"rule": "max_words: 3", "runs": runs})
    assert "| 16 | not run | not run | 30.0% ± 10.0 (n=3) | 40.0% ± 10.0 (n=3) |" in md
    assert "| 90.0% ± 0.0 (n=3) |" in md  # dpo_all joins every seed size
    assert "| 16 | 0 | +10.0 | +10.0 |" in md and "| 16 | 1 | +0.0 | +10.0 |" in md
    assert "| 16 | 2 | 75.0% (3/4) | 50.0% (1/2) |" in md


def test_sweep_table_shows_each_expert_beside_the_labels(mods):
    acc = {"correct": 7, "total": 10, "interval_low": 0.4, "interval_high": 0.9}
    run = {"size": 572, "seed": 0, "seconds": 12.0, "labels": acc}
    run["experts"] = {"crossfit/loglik": {**acc, "correct": 8}}
    md = mods.sweep.table({"runs": [run]})
    assert "| rows | seed | labels | crossfit/loglik | time (s) |" in md
    assert "| 572 | 0 | 70.0% [40, 90] | 80.0% [40, 90] | 12 |" in md


def test_the_rule_gold_example_reads_a_rule_for_every_prompt():
    """yaml_examples/spa-rule-gold.yml: its prompts load with their rules, and its
    seed pairs keep the rule on the chosen side and break it on the rejected."""
    import json

    import yaml

    from axolotl_prefalign.core.config import prefalign_config
    from axolotl_prefalign.spa.gold import keeps_rule
    from axolotl_prefalign.spa.prompts import iteration_prompts

    repo = QUALITY.parents[1]
    cfg = yaml.safe_load((repo / "yaml_examples" / "spa-rule-gold.yml").read_text())
    spa = prefalign_config(cfg).spa
    source = spa.prompts[0]
    source.path = str(repo / source.path)
    parts = iteration_prompts(spa)
    assert [len(p) for p in parts] == [8, 8]
    assert {g for p in parts for g in p["gold"]} == {"max_words: 12"}
    seed = repo / cfg["datasets"][0]["path"]
    for line in seed.read_text().splitlines():
        pair = json.loads(line)
        assert keeps_rule(pair["chosen"], "max_words: 12")
        assert not keeps_rule(pair["rejected"], "max_words: 12")
