"""RobustFT's expert options beyond the paper: option log-likelihood scoring, a
cross-fitted self-trained expert, cleanlab detection and per-label quota selection.
Values are checked against plain references (a direct forward of the tiny model,
cleanlab on the same matrix, quotas by hand); errors by their message."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from datasets import Dataset
from test_robustft_pipeline import (
    REPLIES,
    ROWS,
    FakeModel,
    bow_encoder,
    by_index,
    noisy_dataset,
    settings,
)

from axolotl_prefalign.core.config import (
    PrefAlignConfig,
    PrefAlignConfigError,
    RobustFTConfig,
)
from axolotl_prefalign.core.shards import MANIFEST
from axolotl_prefalign.robustft import pipeline as P
from axolotl_prefalign.robustft.crossfit import (
    LoraCrossfit,
    crossfit_option_probs,
    fold_assignment,
    train_lora,
)
from axolotl_prefalign.robustft.detect import DetectionError, cleanlab_noisy
from axolotl_prefalign.robustft.predict import load_model_predictor, predict_rows
from axolotl_prefalign.robustft.select import largest_remainder, select_by_quota

# --------------------------------------------------------------- test doubles


def softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


class ScoringModel(FakeModel):
    """FakeModel that also scores option texts: logliks[(question, option)]."""

    def __init__(self, replies, logliks, default=-5.0):
        super().__init__(replies)
        self.logliks, self.default = logliks, default
        self.scored: list[tuple[str, str]] = []

    def reply_logliks(self, prompts, replies):
        out = []
        for prompt, reply in zip(prompts, replies, strict=True):
            question = prompt.split("\n\n", 1)[0]
            self.scored.append((question, reply))
            out.append(self.logliks.get((question, reply), self.default))
        return out


def run(tmp_path, model, name="out", ds=None, fit=None, **kw):
    return P.denoise_dataset(
        ds if ds is not None else noisy_dataset(),
        settings(**kw),
        tmp_path / name,
        base_model="fake-model",
        source="toy.jsonl",
        load_predictor=lambda path: model,
        encoder=bow_encoder,
        crossfit_fit=fit,
    )


def two_option_set(labels, gold=None):
    """Sentiment-style rows: options negative / positive, labels A / B."""
    gold = gold or labels
    return Dataset.from_list(
        [
            {
                "question": f"Review {i}: is it negative or positive?",
                "options": ["negative", "positive"],
                "answer": label,
                "gold": g,
            }
            for i, (label, g) in enumerate(zip(labels, gold, strict=True))
        ]
    )


# ------------------------------------------------------------------- config


def test_new_settings_default_to_the_paper():
    cfg = RobustFTConfig()
    assert (cfg.expert_scoring, cfg.expert_training) == ("generate", "none")
    assert (cfg.detection, cfg.selection) == ("agreement", "entropy")
    assert cfg.crossfit_folds == 3 and cfg.crossfit_epochs == 2
    assert cfg.crossfit_learning_rate == 2e-4 and cfg.crossfit_lora_r == 16
    assert cfg.crossfit_batch_size == 8
    assert cfg.relabel is True


def test_each_setting_value_picks_one_named_unit():
    """Every value of every choice setting has its own unit in options.OPTIONS,
    documented under its YAML spelling, and pick_options returns it."""
    from typing import Literal, get_args, get_origin

    from axolotl_prefalign.robustft.options import OPTIONS, pick_options

    # Values passed straight to the answer comparison and the vote rule.
    parameters = {"answer_type", "agreement"}
    choices = {
        name: get_args(f.annotation)
        for name, f in RobustFTConfig.model_fields.items()
        if get_origin(f.annotation) is Literal
    }
    assert set(choices) - parameters == set(OPTIONS)
    for name, values in choices.items():
        if name in parameters:
            continue
        units = OPTIONS[name]
        assert set(units) == set(values), name
        assert len({type(u) for u in units.values()}) == len(values), name
        for value, unit in units.items():
            assert type(unit).__doc__.startswith(f"{name}: {value}"), type(unit)
            picked = pick_options(RobustFTConfig.model_construct(**{name: value}))
            assert unit in vars(picked).values()


def test_cleanlab_needs_option_probabilities():
    with pytest.raises(PrefAlignConfigError, match="detection: cleanlab needs option"):
        PrefAlignConfig.from_raw({"robustft": {"detection": "cleanlab"}})
    for ok in ({"expert_scoring": "loglik"}, {"expert_training": "crossfit"}):
        cfg = RobustFTConfig(detection="cleanlab", **ok)
        assert cfg.detection == "cleanlab"
    with pytest.raises(PrefAlignConfigError, match="crossfit_folds"):
        PrefAlignConfig.from_raw({"robustft": {"crossfit_folds": 1}})


def test_cache_key_covers_every_new_setting():
    ds = noisy_dataset()
    key = P.cache_key(settings(), ds, base_model="m", on_bad_row="error")
    changed = [
        {"expert_scoring": "loglik"},
        {"expert_training": "crossfit"},
        {"crossfit_folds": 4},
        {"crossfit_epochs": 1.0},
        {"crossfit_learning_rate": 1e-3},
        {"crossfit_lora_r": 8},
        {"crossfit_batch_size": 4},
        {"seed": 1},
        {"detection": "cleanlab", "expert_scoring": "loglik"},
        {"selection": "quota"},
        {"relabel": False},
    ]
    keys = {
        P.cache_key(settings(**c), ds, base_model="m", on_bad_row="error")
        for c in changed
    }
    assert len(keys | {key}) == len(changed) + 1


# ------------------------------------------------------------ loglik scoring


def test_loglik_option_probs_match_a_direct_forward(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pred = load_model_predictor(str(tiny_model_dir), batch_size=3)
    rows = Dataset.from_list(
        [
            {
                "idx": 0,
                "question": "What is the capital of France?",
                "options": ["Berlin", "Paris", "Rome is the capital"],
                "kind": "choice",
            },
            {"idx": 1, "question": "How many legs?", "options": None, "kind": "number"},
        ]
    )
    out = predict_rows(
        rows,
        pred,
        reasoning=False,
        max_new_tokens=4,
        answer_max_new_tokens=4,
        batch_size=2,
        scorer=pred.reply_logliks,
    )
    # Reference: the whole conversation through the model, full log_softmax, the
    # sum over the reply tokens (the option text and the end of turn).
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    user = (
        "What is the capital of France?\n\nA. Berlin\nB. Paris\nC. Rome is the capital"
    )
    ref = []
    for option in rows[0]["options"]:
        msgs = [{"role": "user", "content": user}]
        head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*msgs, {"role": "assistant", "content": option}], tokenize=False
        )
        h = tok(head, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(h)] == h
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        ref.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(h), len(ids))))
    got = out[0]
    np.testing.assert_allclose(got["option_logliks"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["option_probs"], softmax(ref), rtol=1e-4, atol=1e-6)
    assert got["loglik_answer"] == "ABC"[int(np.argmax(ref))]
    assert got["plain"] is None
    # The number row is generated as before.
    assert isinstance(out[1]["plain"], str) and out[1]["option_probs"] is None


def test_loglik_votes_carry_option_probs_and_text_rows_fall_back(tmp_path, caplog):
    rows = [
        {"question": ROWS[0][0], "options": ROWS[0][1], "answer": "B", "gold": "B"},
        {"question": ROWS[2][0], "options": ROWS[2][1], "answer": "A", "gold": "C"},
        {"question": "How many apples?", "options": None, "answer": "5", "gold": "5"},
    ]
    logliks = {
        (ROWS[0][0], "Paris"): -0.5,
        (ROWS[0][0], "Berlin"): -3.0,
        (ROWS[2][0], "Madrid"): -1.0,
        (ROWS[2][0], "Lisbon"): -2.0,
    }
    replies = {
        ("plain", "How many apples?"): "Answer: 5",
        ("reasoning", "How many apples?"): "Answer: 5",
        ("reasoning", ROWS[0][0]): "Answer: B",
        ("reasoning", ROWS[2][0]): "Answer: C",
    }
    model = ScoringModel(replies, logliks)
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        result = run(
            tmp_path, model, ds=Dataset.from_list(rows), expert_scoring="loglik"
        )
    # Choice rows are never asked for a plain generated letter; the number row is.
    asked = {(k, q) for k, q in model.calls}
    assert ("plain", ROWS[0][0]) not in asked and ("plain", "How many apples?") in asked
    assert ("reasoning", ROWS[0][0]) in asked  # ŷ_r is still generated
    assert "1 of 3 row(s) are number/text answers" in caplog.text
    assert result.report["loglik_fallback_rows"] == 1
    got = by_index(result)
    first = got[0]["robustft_votes"]
    assert [(v["prompt"], v["answer"], v["agrees"]) for v in first] == [
        ("loglik", "B", True),
        ("reasoning", "B", True),
    ]
    expected = softmax([-3.0, -0.5, -5.0, -5.0])  # Berlin, Paris, Rome, Madrid
    np.testing.assert_allclose(first[0]["option_probs"], expected)
    assert first[1]["option_probs"] is None
    np.testing.assert_allclose(got[0]["robustft_option_probs"], expected)
    assert got[0]["robustft_status"] == "clean"
    assert got[1]["robustft_status"] != "clean"  # loglik says C, label A
    assert got[2]["robustft_option_probs"] is None
    assert got[2]["robustft_status"] == "clean"  # generated 5 agrees
    assert result.report["expert_scoring"] == "loglik"
    saved = json.loads((result.out_dir / "report.json").read_text())
    assert saved["expert_scoring"] == "loglik" and saved["detection"] == "agreement"


# ------------------------------------------------------------------ cleanlab


def _sentiment_case():
    gold = ["A", "B"] * 8
    labels = list(gold)
    for i in (1, 4, 9):  # flipped labels
        labels[i] = "B" if gold[i] == "A" else "A"
    ds = two_option_set(labels, gold)
    logliks = {}
    for i, q in enumerate(ds["question"]):
        right = "negative" if gold[i] == "A" else "positive"
        wrong = "positive" if right == "negative" else "negative"
        margin = 0.3 if i in (2, 7) else 2.0  # two rows the expert is unsure of
        logliks[(q, right)], logliks[(q, wrong)] = -0.2, -0.2 - margin
    return ds, labels, logliks


def test_cleanlab_flags_what_find_label_issues_flags(tmp_path):
    from cleanlab.filter import find_label_issues

    ds, labels, logliks = _sentiment_case()
    result = run(
        tmp_path,
        ScoringModel({}, logliks),
        ds=ds,
        expert_scoring="loglik",
        detection="cleanlab",
        reasoning=False,
    )
    got = by_index(result)
    probs = np.array([got[i]["robustft_option_probs"] for i in range(len(ds))])
    ref = find_label_issues(np.array(["AB".index(x) for x in labels]), probs)
    flagged = [i for i in range(len(ds)) if got[i]["robustft_status"] != "clean"]
    assert flagged == [i for i, f in enumerate(ref) if f]
    assert {1, 4, 9} <= set(flagged)
    assert result.report["detection"] == "cleanlab"


def test_relabel_false_drops_the_flagged_rows_and_keeps_the_rest_as_labelled(
    tmp_path,
):
    from axolotl_prefalign.robustft.stages import NOT_RELABELLED

    ds, labels, logliks = _sentiment_case()
    kw = {"expert_scoring": "loglik", "detection": "cleanlab", "reasoning": False}
    paper = run(tmp_path, ScoringModel({}, logliks), "paper", ds=ds, **kw)
    model = ScoringModel({}, logliks)
    result = run(tmp_path, model, "keep", ds=ds, relabel=False, **kw)
    got = by_index(result)
    # detection is the same; the flagged rows are dropped, not relabelled
    flagged = [i for i in range(len(ds)) if got[i]["robustft_status"] != "clean"]
    want = [i for i, r in by_index(paper).items() if r["robustft_status"] != "clean"]
    assert flagged == want and {1, 4, 9} <= set(flagged)
    for i in flagged:
        assert got[i]["robustft_status"] == "dropped"
        assert got[i]["robustft_drop_reason"] == NOT_RELABELLED
        assert got[i]["robustft_new_answer"] is None
    kept = [i for i in range(len(ds)) if i not in flagged]
    assert [r["robustft_index"] for r in result.train] == kept
    assert list(result.train["answer"]) == [labels[i] for i in kept]  # as labelled
    # neither the relabel nor the review stage ran: no generation, no folders
    assert model.calls == []
    assert not (result.out_dir / "relabel").exists()
    assert not (result.out_dir / "review").exists()
    report = result.report
    assert (report["relabel"], report["relabelled"], report["selected"]) == (
        False,
        0,
        0,
    )
    assert report["dropped"] == len(flagged) and report["train_rows"] == len(kept)
    right = sum(labels[i] == ds[i]["gold"] for i in kept)
    assert report["gold"]["label_accuracy_out"] == pytest.approx(right / len(kept))
    assert "relabel off" in P.format_report(report)
    assert result.out_dir != paper.out_dir


def test_cleanlab_needs_each_class_and_choice_rows():
    probs = np.array([[0.9, 0.1]] * 5 + [[0.2, 0.8]])
    with pytest.raises(DetectionError, match=r"at least 2 rows labelled with each"):
        cleanlab_noisy([0, 0, 0, 0, 0, 1], probs)
    with pytest.raises(DetectionError, match=r"too few for B: 0"):
        cleanlab_noisy([0] * 6, probs)


def test_cleanlab_rejects_rows_without_option_probs(tmp_path):
    ds, _, logliks = _sentiment_case()
    mixed = Dataset.from_list(
        [{**r} for r in ds]
        + [{"question": "How many?", "options": None, "answer": "5", "gold": "5"}]
    )
    model = ScoringModel({("plain", "How many?"): "Answer: 5"}, logliks)
    with pytest.raises(P.RobustFTError, match="option probabilities for every row"):
        run(
            tmp_path,
            model,
            ds=mixed,
            expert_scoring="loglik",
            detection="cleanlab",
            reasoning=False,
        )


def test_cleanlab_rejects_a_mix_of_option_counts(tmp_path):
    ds, _, logliks = _sentiment_case()
    three = {
        "question": "Which?",
        "options": ["x", "y", "z"],
        "answer": "A",
        "gold": "A",
    }
    with pytest.raises(P.RobustFTError, match="same number of options"):
        run(
            tmp_path,
            ScoringModel({}, logliks),
            ds=Dataset.from_list([*ds, three]),
            expert_scoring="loglik",
            detection="cleanlab",
            reasoning=False,
        )


# ------------------------------------------------------------------ crossfit


class RecordingFit:
    """A FoldFit that records which rows each fold trained on and scores the held
    rows from fixed log-likelihoods; optionally crashes at one call."""

    def __init__(self, logliks, crash_at=None):
        self.logliks, self.crash_at = logliks, crash_at
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def __call__(self, fold, train, held):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise RuntimeError("injected crash")
        self.calls.append((fold, [r["idx"] for r in train], [r["idx"] for r in held]))
        return [
            [self.logliks.get((r["question"], o), -5.0) for o in r["options"]]
            for r in held
        ]


def _choice_rows(ds):
    rows, _ = P.prepare_rows(ds, settings(), P.RowChecker("t", "error"))
    return rows


def test_fold_assignment_is_seeded_and_balanced():
    a = fold_assignment(range(10), 3, seed=7)
    assert a == fold_assignment(list(reversed(range(10))), 3, seed=7)
    assert a != fold_assignment(range(10), 3, seed=8)
    sizes = sorted(list(a.values()).count(k) for k in range(3))
    assert sizes == [3, 3, 4]


def test_crossfit_scores_each_row_with_a_model_that_never_saw_it(tmp_path):
    ds, _, logliks = _sentiment_case()
    rows = _choice_rows(ds)
    fit = RecordingFit(logliks)
    oof = crossfit_option_probs(rows, fit, folds=3, seed=0, out_dir=tmp_path / "cf")
    everyone = set(rows["idx"])
    held_by = {}
    for fold, train, held in fit.calls:
        assert not set(train) & set(held)
        assert set(train) | set(held) == everyone
        for i in held:
            assert i not in held_by
            held_by[i] = fold
        meta = json.loads((tmp_path / "cf" / f"fold-{fold}" / MANIFEST).read_text())
        assert meta["meta"]["train"] == sorted(train) and meta["complete"]
    assert set(held_by) == everyone
    assert [r["fold"] for r in oof] == [held_by[i] for i in oof["idx"]]
    q0 = ds[0]["question"]
    np.testing.assert_allclose(
        oof[0]["option_probs"],
        softmax([logliks[(q0, "negative")], logliks[(q0, "positive")]]),
    )


def test_crossfit_resumes_without_retraining_finished_folds(tmp_path):
    ds, _, logliks = _sentiment_case()
    rows = _choice_rows(ds)
    crashing = RecordingFit(logliks, crash_at=1)
    with pytest.raises(RuntimeError, match="injected crash"):
        crossfit_option_probs(rows, crashing, folds=3, seed=0, out_dir=tmp_path / "cf")
    again = RecordingFit(logliks)
    oof = crossfit_option_probs(rows, again, folds=3, seed=0, out_dir=tmp_path / "cf")
    assert [c[0] for c in crashing.calls] == [0]
    assert [c[0] for c in again.calls] == [1, 2]
    fresh = crossfit_option_probs(
        rows, RecordingFit(logliks), folds=3, seed=0, out_dir=tmp_path / "fresh"
    )
    assert oof.to_list() == fresh.to_list()


def test_crossfit_expert_votes_and_feeds_cleanlab(tmp_path):
    from cleanlab.filter import find_label_issues

    ds, labels, logliks = _sentiment_case()
    fit = RecordingFit(logliks)
    base = FakeModel({})  # generated answers: "no idea"
    result = run(
        tmp_path,
        base,
        ds=ds,
        fit=fit,
        expert_training="crossfit",
        detection="cleanlab",
        crossfit_folds=4,
        reasoning=False,
    )
    assert len(fit.calls) == 4
    assert result.report["experts"] == ["base", "crossfit"]
    assert result.report["expert_training"] == "crossfit"
    got = by_index(result)
    votes = got[0]["robustft_votes"]
    assert [(v["expert"], v["prompt"]) for v in votes] == [
        ("base", "plain"),
        ("crossfit", "loglik"),
    ]
    probs = np.array([got[i]["robustft_option_probs"] for i in range(len(ds))])
    np.testing.assert_allclose(probs[0], votes[1]["option_probs"])
    ref = find_label_issues(np.array(["AB".index(x) for x in labels]), probs)
    flagged = [i for i in range(len(ds)) if got[i]["robustft_status"] != "clean"]
    assert flagged == [i for i, f in enumerate(ref) if f]
    # the folds are cached beside the run's folder, by what they depend on
    (cache,) = (tmp_path / "crossfit").iterdir()
    assert (cache / "fold-3" / MANIFEST).exists()


def test_runs_on_the_same_rows_share_the_crossfit_folds(tmp_path):
    ds, _, logliks = _sentiment_case()
    first = RecordingFit(logliks)
    kw = {"expert_training": "crossfit", "crossfit_folds": 4, "reasoning": False}
    a = run(tmp_path, FakeModel({}), "a", ds=ds, fit=first, detection="cleanlab", **kw)
    again = RecordingFit(logliks)
    b = run(tmp_path, FakeModel({}), "b", ds=ds, fit=again, **kw)  # agreement
    assert len(first.calls) == 4 and again.calls == []  # reused, not retrained
    assert a.out_dir != b.out_dir
    probs = [r["robustft_option_probs"] for r in b.all_rows]
    want = [r["robustft_option_probs"] for r in a.all_rows]
    assert probs == want
    # another seed splits the folds differently: trained afresh
    other = RecordingFit(logliks)
    run(tmp_path, FakeModel({}), "c", ds=ds, fit=other, seed=1, **kw)
    assert len(other.calls) == 4
    assert len(list((tmp_path / "crossfit").iterdir())) == 2


def test_the_fold_cache_names_the_default_model_one_way(tmp_path, monkeypatch):
    """`prefalign:default` in a YAML and the prepared folder the Axolotl CLI hands
    on are the same model: the second run reuses the first one's folds."""
    import axolotl_prefalign.core.models as models

    real = models.resolve_model_path
    monkeypatch.setattr(
        models,
        "resolve_model_path",
        lambda p: "/cache/smollm2" if p == "default" else real(p),
    )
    ds, _, logliks = _sentiment_case()
    calls = []
    for name, base in (("a", "prefalign:default"), ("b", "/cache/smollm2")):
        fit = RecordingFit(logliks)
        P.denoise_dataset(
            ds,
            settings(expert_training="crossfit", crossfit_folds=2, reasoning=False),
            tmp_path / name,
            base_model=base,
            load_predictor=lambda path: FakeModel({}),
            encoder=bow_encoder,
            crossfit_fit=fit,
        )
        calls.append(len(fit.calls))
    assert calls == [2, 0]


def test_crossfit_needs_choice_rows(tmp_path):
    rows = [{"question": "How many?", "answer": "5", "gold": "5"}] * 4
    with pytest.raises(P.RobustFTError, match="crossfit needs multiple-choice rows"):
        run(
            tmp_path,
            FakeModel({}),
            ds=Dataset.from_list(rows),
            fit=RecordingFit({}),
            expert_training="crossfit",
        )


def test_train_lora_lowers_the_answer_loss(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    options = ["negative", "positive"]
    examples = [(f"Review {i}?", options, "positive") for i in range(4)]
    losses = train_lora(
        model, tok, examples, epochs=10, learning_rate=2e-2, batch_size=2, seed=0
    )
    assert len(losses) == 20  # ceil(10 · ceil(4 / 2))
    # Deterministic (seeded, CPU): about 5.8 → 5.0 per step over the first/last two.
    assert sum(losses[-2:]) < sum(losses[:2]) - 1.0


def test_lora_crossfit_trains_each_fold_from_the_untouched_base(tiny_model_dir):
    fit = LoraCrossfit(
        str(tiny_model_dir),
        epochs=2,
        learning_rate=1e-2,
        lora_r=4,
        batch_size=2,
        seed=0,
    )
    ds, _, _ = _sentiment_case()
    rows = list(_choice_rows(ds))
    train, held = rows[:6], rows[6:8]
    before = fit_base_scores(fit, held)
    first = fit(0, train, held)
    after = fit_base_scores(fit, held)
    np.testing.assert_allclose(after, before, rtol=1e-6)  # the adapter is gone
    assert not np.allclose(first, before)  # the trained adapter scored the rows
    np.testing.assert_allclose(fit(0, train, held), first, rtol=1e-5)  # seeded


def fit_base_scores(fit, held):
    from axolotl_prefalign.robustft.loglik import reply_logliks
    from axolotl_prefalign.robustft.predict import option_logliks

    fit._load()
    return option_logliks(
        held,
        lambda p, r: reply_logliks(fit.model, fit.tokenizer, p, r, batch_size=4),
    )


# ----------------------------------------------------------------- selection


def test_largest_remainder_quotas_by_hand():
    # 4 split as 6 : 3 : 1 → exact 2.4, 1.2, 0.4 → floors 2, 1, 0; one more to the
    # largest remainder (A and C tie at 0.4: A sorts first).
    assert largest_remainder(4, {"A": 6, "B": 3, "C": 1}) == {"A": 3, "B": 1, "C": 0}
    # 5 as 1 : 1 : 1 → 1.67 each → 1, 1, 1 and two more to A, B.
    assert largest_remainder(5, {"C": 1, "B": 1, "A": 1}) == {"A": 2, "B": 2, "C": 1}
    assert largest_remainder(3, {"A": 2, "B": 1}) == {"A": 2, "B": 1}


def test_select_by_quota_counts_per_label_and_caps():
    cands = Dataset.from_list(
        [
            {"idx": 10, "new_label": "A", "entropy": 0.5},
            {"idx": 11, "new_label": "A", "entropy": 0.1},
            {"idx": 12, "new_label": "B", "entropy": 0.9},
            {"idx": 13, "new_label": "A", "entropy": 0.3},
            {"idx": 14, "new_label": "B", "entropy": 0.2},
            {"idx": 15, "new_label": "A", "entropy": 0.05},
            {"idx": 16, "new_label": "A", "entropy": 0.7},
        ]
    )
    # total ceil(0.5 · 7) = 4; input 6 A : 3 B : 1 C → A 3, B 1, C 0.
    kept, plan = select_by_quota(cands, 0.5, list("AAAAAABBBC"))
    assert kept["idx"] == [11, 13, 14, 15]  # lowest H within A; B's best
    assert plan == {
        "A": {"quota": 3, "available": 5, "kept": 3},
        "B": {"quota": 1, "available": 2, "kept": 1},
        "C": {"quota": 0, "available": 0, "kept": 0},
    }
    # Input mostly B: B's quota 4 is capped by its 2 candidates; the shortfall of
    # 2 goes to A (the only label with candidates to spare): its lowest H.
    kept, plan = select_by_quota(cands, 0.5, list("ABBBBBBBBB"))
    assert plan["B"] == {"quota": 4, "available": 2, "kept": 2}
    assert plan["A"] == {"quota": 0, "available": 5, "kept": 2}
    assert kept["idx"] == [11, 12, 14, 15]
    # The shortfall is split like the input shares among the labels with spare.
    kept, plan = select_by_quota(cands, 1.0, list("CCCCCCAB"))
    assert {c: p["kept"] for c, p in plan.items()} == {"A": 5, "B": 2, "C": 0}


def test_report_has_label_distribution_in_every_mode(tmp_path):
    result = run(tmp_path, FakeModel(REPLIES))
    # Labels in: B B A B A C D C; relabelled: 2 → C, 3 → B, 4 → B; kept: clean
    # 0, 1, 7 (B, B, C) + selected 2, 3 (C, B).
    assert result.report["label_distribution"] == {
        "input": {"A": 2, "B": 3, "C": 2, "D": 1},
        "relabelled": {"B": 2, "C": 1},
        "train": {"B": 3, "C": 2},
    }
    assert result.report["selection"] == "entropy"
    text = P.format_report(result.report)
    assert "label" in text and "relabelled" in text
    assert any(line.split() == ["B", "3", "2", "3"] for line in text.splitlines())
    md = P.report_markdown(result.report)
    assert "| label | input | relabelled | kept for training |" in md
    assert "| D | 1 | 0 | 0 |" in md


def test_quota_selection_in_the_pipeline(tmp_path):
    result = run(tmp_path, FakeModel(REPLIES), selection="quota")
    # Candidates 2 (C, H 0.1), 3 (B, 0.3), 4 (B, 0.5); total ceil(1.5) = 2 split
    # like the input A2 B3 C2 D1: exact .5 .75 .5 .25 → floors 0, then B (.75) and
    # A (.5, ties with C and sorts first) get one each. A has no candidate: its
    # one goes to B or C by their shares 3 : 2 → B. So both B rows are kept.
    assert result.report["selection_quotas"] == {
        "A": {"quota": 1, "available": 0, "kept": 0},
        "B": {"quota": 1, "available": 2, "kept": 2},
        "C": {"quota": 0, "available": 1, "kept": 0},
        "D": {"quota": 0, "available": 0, "kept": 0},
    }
    got = by_index(result)
    assert [got[i]["robustft_status"] for i in (2, 3, 4)] == [
        "dropped",
        "relabelled",
        "relabelled",
    ]
    assert "quota" in got[2]["robustft_drop_reason"]
    assert result.report["selection"] == "quota"
    assert result.report["label_distribution"]["train"] == {"B": 4, "C": 1}
