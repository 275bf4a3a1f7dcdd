"""`prefalign spa-premise` and `prefalign robustft-premise`: the premise checks that
run before SPA / RobustFT, on the tiny random Llama (SPA: real judging, canned
sampling; RobustFT: fixed expert replies, and once the real tiny model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_robustft_pipeline import REPLIES, ROWS, FakeModel, bow_encoder

from axolotl_prefalign.cli import load_config, prefalign
from axolotl_prefalign.core.accuracy import binomial_accuracy
from axolotl_prefalign.core.config import RobustFTConfig
from axolotl_prefalign.core.shards import read_shards
from axolotl_prefalign.robustft import pipeline as P
from axolotl_prefalign.robustft.errors import RobustFTError
from axolotl_prefalign.robustft.premise import check_premise as robustft_premise
from axolotl_prefalign.robustft.premise import format_premise, verdicts
from axolotl_prefalign.spa import expand as expand_mod
from axolotl_prefalign.spa.loop import SpaLoopError
from axolotl_prefalign.spa.premise import verdict

PLUGIN = "axolotl_prefalign.PrefAlignPlugin"
CAPITALS = ["Paris", "London", "Berlin", "Madrid"]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's score interval, written out (the plain reference)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _invoke(*args: str):
    return CliRunner().invoke(prefalign, list(args), catch_exceptions=False)


# --------------------------------------------------------------------- intervals


@pytest.mark.parametrize("k,n", [(0, 5), (3, 5), (5, 5), (60, 100), (7, 12)])
def test_interval_is_wilsons(k, n):
    acc = binomial_accuracy(k, n)
    assert (acc.low, acc.high) == pytest.approx(wilson(k, n))
    assert acc.rate == k / n


def test_spa_verdict_holds_only_above_chance_at_the_lower_bound():
    # 60/100: lower bound 0.502; 59/100: 0.492 (Wilson).
    above, below = binomial_accuracy(60, 100), binomial_accuracy(59, 100)
    assert above.low > 0.5 > below.low
    holds, line = verdict(above)
    assert holds and line.startswith("premise holds")
    assert "below the 65% bar" in line
    holds, line = verdict(below)
    assert not holds and line.startswith("premise not shown")
    assert "lower bound 49.2% is not above chance (50%)" in line
    holds, line = verdict(binomial_accuracy(80, 100))
    assert holds and "bar" not in line
    holds, line = verdict(binomial_accuracy(0, 0))
    assert not holds and line.startswith("undecided")


def test_robustft_verdict_holds_only_for_an_expert_above_the_labels():
    labels = binomial_accuracy(50, 100)
    lines = verdicts(
        {
            "base/plain": binomial_accuracy(51, 100),
            "base/reasoning": binomial_accuracy(50, 100),
            "big/plain": binomial_accuracy(49, 100),
        },
        labels,
    )
    assert lines["base/plain"].startswith("premise holds for expert base/plain")
    assert "intervals overlap" in lines["base/plain"]
    assert lines["base/reasoning"].startswith("premise not shown")
    assert lines["big/plain"].startswith("premise not shown")
    strong = verdicts({"x/plain": binomial_accuracy(95, 100)}, labels)["x/plain"]
    assert strong.startswith("premise holds") and "overlap" not in strong


# --------------------------------------------------------------------------- SPA


def _right(letter: str) -> str:
    return f"Answer: {letter}"


def _spa_yaml(tmp_path, tiny_model_dir, gold=True) -> Path:
    rows = [
        {"q": f"Question {k}?", "answer": "ABCD"[k % 4], "choices": CAPITALS}
        for k in range(8)
    ]
    source = {"path": str(_jsonl(tmp_path / "mc.jsonl", rows)), "field": "q"}
    if gold:
        source.update(gold_field="answer", gold_options_field="choices")
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {
            "loss": "spa",
            "spa": {
                "iterations": 2,
                "max_new_tokens": 6,
                "shard_size": 4,
                "judge_batch_size": 2,
                "prompts": [source],
            },
        },
        "rl": "dpo",
        "datasets": [
            {
                "path": str(
                    _jsonl(
                        tmp_path / "seed.jsonl",
                        [{"prompt": "a?", "chosen": "b", "rejected": "c"}],
                    )
                ),
                "ds_type": "json",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],  # fmt: skip
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "sequence_len": 256,
    }
    return _yaml(tmp_path / "spa.yml", raw)


@pytest.fixture()
def judge_dir(tmp_path, tiny_tokenizer):
    """Another tiny Llama (other seed) as the judged model: its implicit reward
    against the base is non-zero, so the pairs are not ties."""
    from conftest import build_tiny_llama

    path = tmp_path / "judge"
    build_tiny_llama(path, vocab_size=len(tiny_tokenizer), seed=1)
    return path


@pytest.fixture()
def canned_sampling(monkeypatch):
    """Two answers per prompt: the right option and the next one (a random model
    names no option); judging stays real."""
    answers = [_right(x) for x in "ABCD"]

    def generator(model, tokenizer, spa):
        def run(texts, seed):
            ks = [int(t.split("Question ")[1].split("?")[0]) for t in texts]
            return [[answers[k % 4], answers[(k + 1) % 4]] for k in ks]

        return run

    monkeypatch.setattr(expand_mod, "hf_generator", generator)


def test_spa_premise_prints_the_judges_accuracy_on_the_gold_pairs(
    tmp_path, tiny_model_dir, judge_dir, canned_sampling
):
    """The accuracy printed and written equals a recount of the judged pairs
    against the gold; nothing is trained."""
    config = _spa_yaml(tmp_path, tiny_model_dir)
    result = _invoke("spa-premise", str(config), "-n", "6", "--model", str(judge_dir))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    written = json.loads((out / "spa_premise.json").read_text())
    sample = {r["index"]: r for r in read_shards(out / "spa_premise" / "generations")}
    pairs = list(read_shards(out / "spa_premise" / "pairs"))
    gold = {0: "A", 1: "B", 2: "C", 3: "D"}
    # The sample's rows came from prompts "Question k?" whose gold is "ABCD"[k % 4].
    right = [
        p["chosen"] == _right(gold[int(p["prompt"].split()[1][:-1]) % 4]) for p in pairs
    ]
    assert len(sample) == 6 and written["prompts_sampled"] == 6
    assert written["prompts_with_gold"] == 8
    assert written["judge"]["total"] == len(pairs) >= 4  # ties are dropped
    assert written["judge"]["correct"] == sum(right)
    low, high = wilson(sum(right), len(pairs))
    assert written["judge"]["interval_low"] == pytest.approx(low)
    assert written["judge"]["interval_high"] == pytest.approx(high)
    assert written["chance"] == 0.5 and written["useful_bar"] == 0.65
    assert written["premise_holds"] == (low > 0.5)
    acc = f"{100 * sum(right) / len(pairs):.1f}% ({sum(right)} of {len(pairs)})"
    assert f"judge accuracy   {acc}, 95% interval {100 * low:.1f}%" in result.output
    assert "chance           50%" in result.output
    assert written["verdict"] in result.output
    assert "65% is a useful bar" in result.output
    assert str(out / "spa_premise.json") in result.output
    report = json.loads((out / "spa_premise" / "gold_report.json").read_text())
    assert report["self_labels"]["correct"] == sum(right)
    assert not (out / "iter_0").exists() and not (out / "iter_1").exists()


def test_spa_premise_without_a_seed_model_says_what_to_pass(tmp_path, tiny_model_dir):
    config = _spa_yaml(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(prefalign, ["spa-premise", str(config)])
    assert result.exit_code == 1
    assert "iter_0 holds no seed DPO output; pass --model PATH" in result.output
    assert f"run `prefalign spa {config}`" in result.output


def test_spa_premise_without_gold_says_which_field_to_add(tmp_path, tiny_model_dir):
    config = _spa_yaml(tmp_path, tiny_model_dir, gold=False)
    result = CliRunner().invoke(prefalign, ["spa-premise", str(config)])
    assert result.exit_code == 1
    assert "no prefalign.spa.prompts source names gold_field; add gold_field:" in (
        result.output
    )


@pytest.mark.parametrize(
    "command,option", [("spa-premise", "--samples"), ("robustft-premise", "--rows")]
)
def test_a_sample_size_below_one_is_refused(tmp_path, command, option):
    config = _yaml(tmp_path / "c.yml", {"base_model": "x"})
    for n in ("0", "-3"):
        result = CliRunner().invoke(prefalign, [command, str(config), option, n])
        assert result.exit_code == 2
        assert f"Invalid value for '{option}' / '-n': {n} is not in the range x>=1" in (
            result.output
        )


# ---------------------------------------------------------------------- RobustFT


def _robustft_yaml(tmp_path, tiny_model_dir, gold_field="gold", with_gold=True):
    rows = [
        {"question": q, "options": o, "answer": a, **({"gold": g} if with_gold else {})}
        for q, o, a, g in ROWS
    ]
    settings = {"review": "rule", "batch_size": 2, "max_new_tokens": 8}
    settings["answer_max_new_tokens"] = 4
    if gold_field:
        settings["gold_field"] = gold_field
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {"robustft": settings},
        "datasets": [
            {
                "path": str(_jsonl(tmp_path / "noisy.jsonl", rows)),
                "ds_type": "json",
                "type": "axolotl_prefalign.robustft",
            }
        ],
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "sequence_len": 256,
    }
    return _yaml(tmp_path / "rf.yml", raw)


def test_robustft_premise_equals_the_full_runs_report_on_the_same_rows(
    tmp_path, tiny_model_dir
):
    """Each expert's and the labels' accuracy equal the full pipeline's report
    (expert_accuracy, label_accuracy_in) and a hand count; the run stops before
    relabelling."""
    cfg = load_config(_robustft_yaml(tmp_path, tiny_model_dir))
    model = FakeModel(REPLIES)
    result = robustft_premise(cfg, 100, load_predictor=lambda p: model, config="rf")
    assert {kind for kind, _ in model.calls} == {"plain", "reasoning"}
    (entry,) = result["entries"]
    full = P.denoise_dataset(
        [{"question": q, "options": o, "answer": a, "gold": g} for q, o, a, g in ROWS],
        RobustFTConfig(gold_field="gold", review="rule", batch_size=2),
        tmp_path / "full",
        base_model="fake-model",
        load_predictor=lambda p: FakeModel(REPLIES),
        encoder=bow_encoder,
    ).report["gold"]
    accuracy = {k: v["accuracy"] for k, v in entry["experts"].items()}
    assert accuracy == pytest.approx(full["expert_accuracy"])
    # By hand from REPLIES: plain misses row 4 (no answer), reasoning row 3.
    assert accuracy == {"base/plain": 7 / 8, "base/reasoning": 7 / 8}
    assert entry["labels"]["accuracy"] == full["label_accuracy_in"] == 4 / 8
    assert entry["premise_holds"] == ["base/plain", "base/reasoning"]
    written = json.loads((tmp_path / "out/robustft/premise.json").read_text())
    assert written == {k: v for k, v in result.items() if k != "file"}
    assert (written["entries"][0]["experts"]["base/plain"]["interval_low"]) == (
        pytest.approx(wilson(7, 8)[0])
    )
    assert not (Path(entry["predictions_dir"]) / "relabel").exists()
    text = format_premise(result)
    assert "labels           50.0% (4 of 8), 95% interval" in text
    assert (
        "verdict: premise holds for expert base/plain: 87.5% right vs labels 50.0%"
        in text
    )


def test_the_denoise_run_reuses_the_premise_checks_crossfit_folds(
    tmp_path, tiny_model_dir
):
    """The premise check trains the cross-fitted folds once; a denoise run on the
    same rows under the same output parent reads them instead of training."""
    yml = _robustft_yaml(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(yml.read_text())
    block = {"expert_training": "crossfit", "crossfit_folds": 2, "reasoning": False}
    raw["prefalign"]["robustft"].update(block, crossfit_epochs=1)
    cfg = load_config(_yaml(tmp_path / "cf.yml", raw))
    model = FakeModel(REPLIES)
    entry = robustft_premise(cfg, 100, load_predictor=lambda p: model)["entries"][0]
    assert "crossfit/loglik" in entry["experts"]
    (cache,) = (tmp_path / "out/robustft/crossfit").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["fold-0", "fold-1"]

    class MustNotTrain:
        def __call__(self, *args):
            raise AssertionError("the folds were trained again")

    settings = RobustFTConfig(**raw["prefalign"]["robustft"])
    full = P.denoise_dataset(
        [{"question": q, "options": o, "answer": a, "gold": g} for q, o, a, g in ROWS],
        settings,
        tmp_path / "out/robustft/full",
        base_model=str(tiny_model_dir),
        load_predictor=lambda p: FakeModel(REPLIES),
        encoder=bow_encoder,
        crossfit_fit=MustNotTrain(),
    )
    accuracy = full.report["gold"]["expert_accuracy"]["crossfit/loglik"]
    assert accuracy == pytest.approx(entry["experts"]["crossfit/loglik"]["accuracy"])


def test_robustft_premise_samples_n_rows_with_gold(tmp_path, tiny_model_dir):
    cfg = load_config(_robustft_yaml(tmp_path, tiny_model_dir))
    result = robustft_premise(cfg, 3, load_predictor=lambda p: FakeModel(REPLIES))
    (entry,) = result["entries"]
    assert entry["rows_with_gold"] == 8
    assert entry["rows_sampled"] == entry["rows_checked"] == 3
    assert entry["labels"]["total"] == 3


def test_robustft_premise_on_the_tiny_model_from_the_cli(tmp_path, tiny_model_dir):
    """The real path: `prefalign robustft-premise` loads the tiny Llama as the
    expert; the printed accuracies are the written ones."""
    config = _robustft_yaml(tmp_path, tiny_model_dir)
    result = _invoke("robustft-premise", str(config), "--rows", "4")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out/robustft/premise.json").read_text())
    (entry,) = written["entries"]
    assert entry["rows_checked"] == 4 and set(entry["experts"]) == {
        "base/plain",
        "base/reasoning",
    }
    labels = binomial_accuracy(entry["labels"]["correct"], 4)
    assert f"labels           {labels.text()}" in result.output
    for name, d in entry["experts"].items():
        line = f"expert {name:<22} {binomial_accuracy(d['correct'], 4).text()}"
        assert line in result.output
    assert "written: " + str(tmp_path / "out/robustft/premise.json") in result.output


def test_robustft_premise_without_gold_names_the_file_and_field(
    tmp_path, tiny_model_dir
):
    config = _robustft_yaml(tmp_path, tiny_model_dir, with_gold=False)
    result = CliRunner().invoke(prefalign, ["robustft-premise", str(config)])
    assert result.exit_code == 1
    noisy = tmp_path / "noisy.jsonl"
    assert f"{noisy}: no row has the field 'gold' (prefalign.robustft.gold_field)" in (
        result.output
    )
    assert "add each row's correct answer as 'gold'" in result.output
    config = _robustft_yaml(tmp_path, tiny_model_dir, gold_field=None)
    with pytest.raises(RobustFTError, match="gold_field is not set") as err:
        robustft_premise(load_config(config), 5)
    assert f"add it to {noisy} as a field (e.g. 'gold')" in str(err.value)


def test_spa_premise_function_refuses_zero_samples(tmp_path, tiny_model_dir):
    from axolotl_prefalign.spa.premise import check_premise

    with pytest.raises(SpaLoopError, match="--samples must be at least 1, got 0"):
        check_premise({}, 0, lambda: None)
    with pytest.raises(RobustFTError, match="--rows must be at least 1, got 0"):
        robustft_premise({}, 0)
