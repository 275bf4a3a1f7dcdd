"""SPA against gold answers: the checkers, the report's counts and rates, the noise
flags the SPA loss records (with and without DND), config errors, and the loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from axolotl_prefalign.core.config import (
    PrefAlignConfig,
    PrefAlignConfigError,
    SpaConfig,
    SpaPromptSource,
)
from axolotl_prefalign.core.preference import JudgeFieldsCollator, PreferenceStep
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.core.shards import ShardWriter, read_shards
from axolotl_prefalign.spa.gold import (
    GoldError,
    answer_is_right,
    flag_scores,
    gold_report,
    gold_summary,
    named_option,
    pool_reports,
    rate_counts,
    read_flags,
    resolve_gold,
)
from axolotl_prefalign.spa.loop import (
    SpaLoopError,
    card_table,
    iteration_prompts,
    load_prompts,
    write_gold_report,
)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "axolotl_prefalign.PrefAlignPlugin"
CAPITALS = ["Paris", "London", "Berlin", "Madrid"]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the checkers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", "B"),
        ("(c)", "C"),
        ("d.", "D"),
        ("B) London", "B"),
        ("C. Berlin is the capital of Germany.", "C"),
        ("Answer: D", "D"),
        ("answer: b.", "B"),
        ("**Answer:** (A)", "A"),
        ("The answer is C.", "C"),
        ("I pick **B**.", "B"),
        ("London is the one.", "B"),  # option text only
        ("Paris, of course.", "A"),
        ("B) London, the big city", "B"),  # letter and text agree
        # The last "Answer:" decides, even after a listing of the options.
        ("A. Paris\nB. London\nC. Berlin\nAnswer: C", "C"),
        # Ambiguous or absent: unknown, never a guess.
        ("A. Paris\nB. London", None),
        ("Either Paris or London.", None),
        ("The answer is A, Berlin.", None),  # letter A, text Berlin (C)
        ("E", None),  # not among the four options
        ("I do not know.", None),
        ("a cat sat on the mat", None),
        ("", None),
    ],
)
def test_choice_checker_names_exactly_one_option(answer, expected):
    assert named_option(answer, CAPITALS) == expected


def test_an_option_inside_a_longer_named_option_is_not_a_second_answer():
    options = ["Paris", "Paris, Texas", "Rome"]
    assert named_option("It is Paris, Texas.", options) == "B"
    assert named_option("Paris!", options) == "A"


def test_choice_without_options_reads_letters_only():
    assert named_option("Answer: (c)") == "C"
    assert named_option("The answer is B") == "B"
    assert named_option("London") is None


@pytest.mark.parametrize(
    ("value", "options", "checker", "gold"),
    [
        ("b", CAPITALS, "choice", "B"),
        ("(C)", CAPITALS, "choice", "C"),
        ("london", CAPITALS, "choice", "B"),
        ("B", CAPITALS, "contains", "London"),
        ("Madrid", CAPITALS, "exact", "Madrid"),
        ("B", None, "choice", "B"),
        ("Paris", None, "contains", "Paris"),
        (42, None, "exact", "42"),
    ],
)
def test_gold_is_a_letter_or_an_option_text(value, options, checker, gold):
    assert resolve_gold(value, options, checker) == gold


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        ("Rome", CAPITALS, "neither an option letter"),
        ("E", CAPITALS, "not among options ABCD"),
        ("Paris", None, "not an option letter; give gold_options_field"),
        ("  ", CAPITALS, "non-empty text"),
        (None, CAPITALS, "missing"),
    ],
)
def test_unusable_gold_is_an_error_saying_why(value, options, message):
    with pytest.raises(GoldError, match=message):
        resolve_gold(value, options, "choice")


@pytest.mark.parametrize(
    ("answer", "checker", "right"),
    [
        ("B) London", "choice", True),
        ("Paris", "choice", False),
        ("Paris or London", "choice", None),
        ("The capital is London.", "contains", True),
        ("Londoners love it.", "contains", False),  # word-bounded
        ("london.", "exact", True),
        ("London, I think", "exact", False),
    ],
)
def test_each_checker_judges_an_answer(answer, checker, right):
    gold = resolve_gold("B", CAPITALS, checker)
    assert answer_is_right(answer, gold, CAPITALS, checker) is right


@pytest.mark.parametrize(
    ("rule", "answer", "kept"),
    [
        ("max_words: 3", "one two three", True),
        ("max_words: 3", "one two three four", False),
        ("max_words: 3", "one\ntwo   three\n", True),  # any whitespace splits
        (" max_words :  3 ", "one two", True),
        ("answer_line", "Paris is big.\nAnswer: B", True),
        ("answer_line", "Paris is big.\n**Answer:** B\n\n", True),
        ("answer_line", "Answer: B\nbecause Paris is big.", False),  # not last
        ("answer_line", "Paris is big. Answer: B", False),  # not its own line
        ("answer_line", "Paris is big.\nAnswer:", False),  # nothing after it
        ("answer_line", "", False),
    ],
)
def test_rule_checker_judges_the_rule_not_an_answer(rule, answer, kept):
    gold = resolve_gold(rule, [], "rule")
    assert answer_is_right(answer, gold, None, "rule") is kept


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("max_words: 0", "at least 1"),
        ("max_words: ten", "is not a rule"),
        ("shorter please", "is not a rule \\(max_words: N \\| answer_line\\)"),
        (30, "a rule must be text"),
    ],
)
def test_an_unknown_rule_is_an_error_naming_the_rules(value, message):
    with pytest.raises(GoldError, match=message):
        resolve_gold(value, [], "rule")


def test_rule_report_counts_pairs_by_the_rule():
    prompts = [{"index": k, "gold": "max_words: 2", "options": []} for k in range(3)]
    pairs = [
        {"index": 0, "chosen": "short one", "rejected": "a much longer one"},
        {"index": 1, "chosen": "a much longer one", "rejected": "short"},
        {"index": 2, "chosen": "ok", "rejected": "fine"},
    ]
    report = gold_report(prompts, pairs, "rule")
    assert (report["exactly_one"], report["both"]) == (2, 1)
    assert report["self_labels"]["correct"] == 1


# -- the report --------------------------------------------------------------------


def _right(letter: str) -> str:
    return f"{letter}) {CAPITALS['ABCD'.index(letter)]}"


# (gold, chosen, rejected) per prompt: every kind of pair, by construction.
CASES = [
    ("A", _right("A"), _right("B")),  # exactly one right, label right
    ("A", _right("C"), _right("A")),  # exactly one right, label wrong
    ("B", _right("B"), _right("C")),  # exactly one right, label right
    ("D", _right("B"), _right("D")),  # exactly one right, label wrong
    ("C", _right("C"), "Answer: C"),  # both right
    ("A", _right("B"), _right("C")),  # neither
    ("A", "Paris or London?", _right("A")),  # unknown (chosen)
    ("B", _right("B"), "no idea"),  # unknown (rejected)
    (None, _right("B"), _right("A")),  # no gold
    ("C", _right("C"), _right("A")),  # exactly one right, label right
]


def _prompts_and_pairs():
    prompts = [
        {"index": k, "gold": gold, "options": CAPITALS}
        for k, (gold, _, _) in enumerate(CASES)
    ]
    pairs = [
        {"index": k, "chosen": c, "rejected": r} for k, (_, c, r) in enumerate(CASES)
    ]
    return prompts, pairs


def test_report_counts_and_accuracy_match_a_plain_reference():
    prompts, pairs = _prompts_and_pairs()
    report = gold_report(prompts, pairs, "choice", iteration=1)
    # The plain reference: the letters each answer names, written out by hand.
    chosen = ["A", "C", "B", "B", "C", "B", None, "B", "B", "C"]
    rejected = ["B", "A", "C", "D", "C", "C", "A", None, "A", "A"]
    kinds = {"exactly_one": 0, "both": 0, "neither": 0, "unknown": 0}
    label_right = []
    for (gold, _, _), c, r in zip(CASES, chosen, rejected, strict=True):
        if gold is None or c is None or r is None:
            kinds["unknown"] += 1
        elif (c == gold) and (r == gold):
            kinds["both"] += 1
        elif (c == gold) or (r == gold):
            kinds["exactly_one"] += 1
            label_right.append(c == gold)
        else:
            kinds["neither"] += 1
    assert (
        {k: report[k] for k in kinds}
        == kinds
        == {
            "exactly_one": 5,
            "both": 1,
            "neither": 1,
            "unknown": 3,
        }
    )
    assert report["pairs"] == len(CASES)
    assert report["unknown_reasons"] == {
        "chosen_unknown": 1,
        "rejected_unknown": 1,
        "no_gold": 1,
    }
    labels = report["self_labels"]
    assert labels == {
        "pairs": 5,
        "correct": sum(label_right),
        "wrong": 5 - sum(label_right),
        "accuracy": sum(label_right) / 5,
    }
    assert labels["accuracy"] == pytest.approx(0.6)
    assert report["noise_flags"]["with_dnd"] is None  # nothing recorded


def _flag(pid, dnd, plain, lam=0.5):
    return {
        "pair_id": pid,
        "confident_dnd": dnd,
        "confident_plain": plain,
        "dnd_lambda": lam,
    }


def test_flag_precision_and_recall_on_the_exactly_one_pairs():
    prompts, pairs = _prompts_and_pairs()
    # Exactly-one pairs 0, 1, 2, 3, 9; labels wrong on 1 and 3.
    flags = {
        0: _flag(0, True, False),
        1: _flag(1, False, True),
        2: _flag(2, True, False),
        3: _flag(3, False, False),
        9: _flag(9, True, True),
        5: _flag(5, False, False),  # a "neither" pair: not scored
    }
    report = gold_report(prompts, pairs, "choice", flags)
    nf = report["noise_flags"]
    assert nf["recorded"] == 5 and nf["missing"] == 0 and nf["dnd_lambda"] == 0.5
    # With DND: flagged {1, 3}, wrong {1, 3}: precision 2/2, recall 2/2.
    assert nf["with_dnd"] == {
        "pairs": 5,
        "flagged": 2,
        "wrong": 2,
        "flagged_wrong": 2,
        "precision": 1.0,
        "recall": 1.0,
        "flagged_fraction": 0.4,
    }
    # Without: flagged {0, 2, 3}: one of three is wrong; one of two wrong found.
    plain = nf["without_dnd"]
    assert (plain["flagged"], plain["flagged_wrong"]) == (3, 1)
    assert plain["precision"] == pytest.approx(1 / 3) and plain["recall"] == 0.5
    assert flag_scores([], []) == {
        "pairs": 0,
        "flagged": 0,
        "wrong": 0,
        "flagged_wrong": 0,
        "precision": None,
        "recall": None,
        "flagged_fraction": None,
    }


def test_pooled_reports_are_the_report_of_all_their_pairs():
    """Pooling two runs' reports gives the report of the two runs' pairs taken
    together: rates of the summed counts, not means of the runs' rates; a kind of
    flag one run did not record counts the other's alone."""
    prompts, pairs = _prompts_and_pairs()
    flags = {k: _flag(k, k % 3 == 0, k % 2 == 0) for k in range(10)}
    a = gold_report(prompts[:4], pairs[:4], "choice", {k: flags[k] for k in range(4)})
    no_dnd = {k: _flag(k, None, k % 2 == 0, lam=0.0) for k in range(4, 10)}
    b = gold_report(prompts[4:], pairs[4:], "choice", no_dnd)
    pooled = pool_reports([a, b])
    both = gold_report(
        prompts, pairs, "choice", {**{k: flags[k] for k in range(4)}, **no_dnd}
    )
    assert pooled["runs"] == 2
    for key in ("pairs", "exactly_one", "both", "neither", "unknown", "self_labels"):
        assert pooled[key] == both[key], key
    assert pooled["noise_flags"]["without_dnd"] == both["noise_flags"]["without_dnd"]
    # DND only in run a: its flags alone, not diluted by b's pairs
    assert pooled["noise_flags"]["with_dnd"] == a["noise_flags"]["with_dnd"]
    assert a["self_labels"]["accuracy"] != b["self_labels"]["accuracy"]
    summary = gold_summary(pooled)
    assert summary["self_label_accuracy"] == both["self_labels"]["accuracy"]
    counts = rate_counts(pooled)
    labels = both["self_labels"]
    assert counts["self_label_accuracy"] == (labels["correct"], labels["pairs"])
    plain = both["noise_flags"]["without_dnd"]
    assert counts["flag_recall_plain"] == (plain["flagged_wrong"], plain["wrong"])
    assert pool_reports([b])["noise_flags"]["with_dnd"] is None


def test_without_dnd_in_the_stage_only_the_plain_flags_are_reported():
    prompts, pairs = _prompts_and_pairs()
    flags = {k: _flag(k, None, k % 2 == 0, lam=0.0) for k in range(10)}
    nf = gold_report(prompts, pairs, "choice", flags)["noise_flags"]
    assert nf["with_dnd"] is None and "DND was off" in nf["note"]
    assert nf["without_dnd"]["flagged"] == 3  # the odd ids 1, 3, 9


# -- the flags the SPA loss records -------------------------------------------------


def _step(tmp_path, **spa):
    cfg = PrefAlignConfig.from_raw(
        {
            "loss": "spa",
            "spa": {
                "iteration": 1,
                "margin_window": 2,
                "noise_quantile": 0.25,
                "flags_file": str(tmp_path / "spa_flags.jsonl"),
                **spa,
            },
        }
    )
    return PreferenceStep(cfg, reference=None)


def test_recorded_flags_match_a_direct_quantile_computation(tmp_path):
    """Three batches of known margins through the window of 2 micro-batches: c =
    1[β·m > τ], τ the 25% quantile of the window's per-sample β·m, computed for
    the DND margins m_g and, separately, for the plain margins h."""
    step = _step(tmp_path)
    beta = 0.1
    g = torch.Generator().manual_seed(0)
    # (pair ids, m_g, h) per micro-batch
    batches = [
        (torch.arange(4) + 4 * b, *torch.randn(2, 4, generator=g)) for b in range(3)
    ]
    expected = []
    for b, (ids, m_g, h) in enumerate(batches):
        confident, alpha = step.spa_confidence(
            m_g, beta=beta, training=True, progress=0.5
        )
        step.record_flags({"pair_id": ids}, h, confident, beta, b, alpha)
        window = slice(max(0, b - 1), b + 1)
        tau_g = torch.quantile(beta * torch.cat([x[1] for x in batches[window]]), 0.25)
        tau_h = torch.quantile(beta * torch.cat([x[2] for x in batches[window]]), 0.25)
        for k in range(4):
            expected.append(
                (int(ids[k]), bool(beta * m_g[k] > tau_g), bool(beta * h[k] > tau_h))
            )
    text = (tmp_path / "spa_flags.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    got = [(r["pair_id"], r["confident_dnd"], r["confident_plain"]) for r in records]
    assert got == expected
    assert {r["dnd_lambda"] for r in records} == {0.5}
    _, m_g, h = batches[2]
    for r in records[8:]:
        k = r["pair_id"] - 8
        assert r["margin_dnd"] == pytest.approx(beta * m_g[k].item())
        assert r["margin_plain"] == pytest.approx(beta * h[k].item())
    # The flags differ somewhere, or the comparison would show nothing.
    assert any(d != p for _, d, p in got)
    assert set(read_flags(tmp_path / "spa_flags.jsonl")) == set(range(12))


def test_without_dnd_the_loss_flags_are_the_plain_flags(tmp_path):
    step = _step(tmp_path, dnd=False)
    h = torch.tensor([0.3, -1.0, 2.0, 0.1])
    confident, alpha = step.spa_confidence(h, beta=0.1, training=True, progress=0.0)
    step.record_flags({"pair_id": torch.arange(4)}, h, confident, 0.1, 0, alpha)
    records = read_flags(tmp_path / "spa_flags.jsonl")
    assert [records[k]["confident_plain"] for k in range(4)] == confident.tolist()
    assert all(records[k]["confident_dnd"] is None for k in range(4))
    assert len(step.plain_window) == 0  # no second window needed


def test_no_flags_file_records_nothing(tmp_path):
    cfg = PrefAlignConfig.from_raw({"loss": "spa"})
    assert PreferenceStep(cfg, reference=None).flags is None


def test_a_batch_without_pair_ids_is_a_clear_error(tmp_path):
    step = _step(tmp_path)
    m = torch.zeros(2)
    confident, alpha = step.spa_confidence(m, beta=0.1, training=True, progress=0.0)
    with pytest.raises(ValueError, match="no pair_id column"):
        step.record_flags({}, m, confident, 0.1, 0, alpha)


def test_collator_carries_pair_ids_as_integers():
    def inner(examples):
        return {"input_ids": torch.zeros(len(examples), 1)}

    batch = JudgeFieldsCollator(inner)(
        [{"judge_prob": 0.6, "pair_id": 2**40 + 1}, {"judge_prob": 1.0, "pair_id": -1}]
    )
    assert batch["pair_id"].dtype == torch.int64
    assert batch["pair_id"].tolist() == [2**40 + 1, -1]


def test_the_dpo_trainer_records_flags_by_pair_id_from_full_logits(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    """Through Axolotl's DPO trainer (TRL tokenisation, our collator): every pair's
    recorded margins equal β·h and β·m_g computed from full logits, with
    z_g = (1 + λ)·z_θ − λ·z_ref."""
    from test_dpo_trainer import _args, _peft_model, _perturb_adapter

    from axolotl_prefalign.integrations.axolotl.trainers.dpo import PrefAlignDPOTrainer

    rows = [
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome.",
         "pair_id": 17},
        {"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " 6 or 7", "pair_id": 3},
        {"prompt": "Say yes.", "chosen": " yes", "rejected": " no no", "pair_id": 40},
        {"prompt": "Is fire hot?", "chosen": " true", "rejected": " cold",
         "pair_id": 8},
    ]  # fmt: skip
    flags = tmp_path / "spa_flags.jsonl"
    cfg = PrefAlignConfig.from_raw(
        {"loss": "spa", "spa": {"iteration": 1, "flags_file": str(flags)}}
    )
    args = _args(tmp_path)
    trainer = PrefAlignDPOTrainer(
        _peft_model(tiny_model_dir),
        None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
        prefalign=cfg,
    )
    _perturb_adapter(trainer.model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)

    from trl.trainer.utils import use_adapter

    def logits(model):
        return (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits[:, :-1]
            .float()
        )

    def seq_logps(z):
        lp = torch.log_softmax(z, -1).gather(-1, batch["input_ids"][:, 1:, None])
        return (lp.squeeze(-1) * batch["completion_mask"][:, 1:]).sum(-1)

    with torch.no_grad():
        z_pol = logits(trainer.model)
        with use_adapter(trainer.model, "ref"):
            z_ref = logits(trainer.model)
    lam = 0.5
    pol, ref = seq_logps(z_pol), seq_logps(z_ref)
    mix = seq_logps((1 + lam) * z_pol - lam * z_ref)
    h = (pol.chunk(2)[0] - ref.chunk(2)[0]) - (pol.chunk(2)[1] - ref.chunk(2)[1])
    m_g = (mix.chunk(2)[0] - ref.chunk(2)[0]) - (mix.chunk(2)[1] - ref.chunk(2)[1])
    records = read_flags(flags)
    ids = batch["pair_id"].tolist()
    assert sorted(ids) == [3, 8, 17, 40] and set(records) == set(ids)
    for k, pid in enumerate(ids):
        r = records[pid]
        assert r["margin_plain"] == pytest.approx(0.1 * h[k].item(), abs=1e-4)
        assert r["margin_dnd"] == pytest.approx(0.1 * m_g[k].item(), abs=1e-4)
        tau = torch.quantile(0.1 * m_g, 0.1).item()
        assert r["confident_dnd"] == (0.1 * m_g[k].item() > tau)


def test_spa_pairs_transform_keeps_the_pair_id(tiny_tokenizer):
    from axolotl_prefalign.integrations.axolotl.spa_pairs import spa_pairs

    fn, _ = spa_pairs({"datasets": [{"path": "p.jsonl"}]})
    batch = {
        "prompt": ["Q1", "Q2"],
        "chosen": ["a", "c"],
        "rejected": ["b", "d"],
        "index": [12, None],
    }
    out = fn(batch, [0, 1], tokenizer=tiny_tokenizer)
    assert out["pair_id"] == [12, -1]


# -- config ------------------------------------------------------------------------


def _gold_rows(n=4):
    return [
        {"q": f"Question {k}?", "answer": "ABCD"[k % 4], "choices": CAPITALS}
        for k in range(n)
    ]


def _source(path, **kw):
    return SpaPromptSource(
        path=str(path),
        field="q",
        gold_field="answer",
        gold_options_field="choices",
        **kw,
    )


def test_prompts_carry_the_resolved_gold(tmp_path):
    rows = _gold_rows()
    rows[1]["answer"] = "london"  # an option's text
    path = _jsonl(tmp_path / "p.jsonl", rows)
    data = load_prompts(_source(path))
    assert data["gold"] == ["A", "B", "C", "D"]
    assert data["options"][0] == CAPITALS
    assert data["index"] == [0, 1, 2, 3]
    contains = load_prompts(_source(path), gold_checker="contains")
    assert contains["gold"] == CAPITALS


def test_a_gold_field_absent_from_the_prompts_names_file_and_field(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", _gold_rows())
    bad = SpaPromptSource(path=str(path), field="q", gold_field="label")
    message = r"p.jsonl has no column 'label' \(gold_field\)"
    with pytest.raises(SpaLoopError, match=message):
        load_prompts(bad)
    bad = _source(path).model_copy(update={"gold_options_field": "opts"})
    with pytest.raises(SpaLoopError, match=r"no column 'opts' \(gold_options_field\)"):
        load_prompts(bad)


def test_a_bad_gold_row_is_an_error_or_an_unknown_never_a_dropped_prompt(
    tmp_path, caplog
):
    rows = _gold_rows()
    rows[2]["answer"] = "Rome"
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(
        BadRowError, match=r"p.jsonl, line 3, field 'answer': 'Rome' is neither"
    ):
        load_prompts(_source(path))
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        data = load_prompts(_source(path), "skip")
    assert data["index"] == [0, 1, 2, 3] and data["gold"][2] is None
    assert "1 prompt(s) without a usable gold answer" in caplog.text


def test_a_bad_rule_in_a_prompt_file_names_file_line_and_field(tmp_path, caplog):
    rows = [{"q": f"Question {k}?", "rule": " max_words :  12 "} for k in range(3)]
    rows[1]["rule"] = "shorter please"
    path = _jsonl(tmp_path / "p.jsonl", rows)
    source = SpaPromptSource(path=str(path), field="q", gold_field="rule")
    with pytest.raises(
        BadRowError, match=r"p.jsonl, line 2, field 'rule': 'shorter please' is not"
    ):
        load_prompts(source, gold_checker="rule")
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        data = load_prompts(source, "skip", gold_checker="rule")
    # every prompt kept; the bad rule counted as unknown, the others canonical
    assert data["index"] == [0, 1, 2]
    assert data["gold"] == ["max_words: 12", None, "max_words: 12"]
    assert "1 prompt(s) without a usable gold answer" in caplog.text


def test_gold_settings_validate_with_clear_messages():
    message = "gold_options_field needs gold_field"
    with pytest.raises(PrefAlignConfigError, match=message):
        PrefAlignConfig.from_raw(
            {"spa": {"prompts": [{"path": "p.jsonl", "gold_options_field": "o"}]}}
        )
    with pytest.raises(PrefAlignConfigError, match="prefalign.spa.gold_checker"):
        PrefAlignConfig.from_raw({"spa": {"gold_checker": "regex"}})
    spa = SpaConfig(prompts=[{"path": "p.jsonl", "gold_field": "answer"}])
    assert spa.has_gold and spa.gold_checker == "choice"
    assert not SpaConfig(prompts=[{"path": "p.jsonl"}]).has_gold


# -- the loop ----------------------------------------------------------------------


class GoldStages:
    """Fakes the stages: expansions write MC pairs with known answers (`CASES`),
    trainings write adapter files and (iterations) a flags file."""

    def __init__(self):
        self.flags_files: dict[str, str | None] = {}

    def __call__(self, cmd: list[str], log: Path) -> None:
        kind = {"train": "train", "merge-lora": "merge", "prefalign": "expand"}[cmd[3]]
        log.write_text("{'loss': 0.5, 'rewards/accuracies': 0.75}\n")
        if kind == "expand":
            out = Path(cmd[cmd.index("--out") + 1])
            it = int(cmd[cmd.index("--iteration") + 1])
            start = (it - 1) * len(CASES)
            writer = ShardWriter(out / "pairs", {"iteration": it})
            rows = [
                {"prompt": f"Question {start + k}?", "chosen": c, "rejected": r,
                 "judge_prob": 0.6, "margin": 0.4, "iteration": it,
                 "index": start + k}
                for k, (_, c, r) in enumerate(CASES)
            ]  # fmt: skip
            writer.write(rows, [r["index"] for r in rows])
            summary = {"iteration": it, "prompts": len(rows), "pairs": len(rows),
                       "ties_dropped": 0, "dropped_empty": 0}  # fmt: skip
            writer.finish(summary)
            (out / "summary.json").write_text(json.dumps(summary))
            return
        conf = yaml.safe_load(Path(cmd[4]).read_text())
        out = Path(conf["output_dir"])
        if kind == "merge":
            (out / "merged").mkdir()
            (out / "merged" / "model.safetensors").write_text("weights")
            return
        (out / "adapter_config.json").write_text("{}")
        (out / "adapter_model.safetensors").write_text("weights")
        flags = conf["prefalign"]["spa"].get("flags_file")
        self.flags_files[out.name] = flags
        if flags:
            start = (conf["prefalign"]["spa"]["iteration"] - 1) * len(CASES)
            # The exactly-one pairs 1 and 3 have wrong labels: DND flags 1 only.
            recs = [
                _flag(start + k, k not in (1, 5), k not in (0, 3)) for k in range(10)
            ]
            Path(flags).write_text("".join(json.dumps(r) + "\n" for r in recs))


def _gold_yaml(tmp_path, tiny_model_dir, gold=True, name="out"):
    gold_rows = [
        {"q": f"Question {k}?", "answer": g or "", "choices": CAPITALS}
        for k, (g, _, _) in enumerate(CASES * 2)
    ]
    source = {"path": str(_jsonl(tmp_path / "prompts.jsonl", gold_rows)), "field": "q"}
    if gold:
        source.update(gold_field="answer", gold_options_field="choices")
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {
            "loss": "spa",
            "on_bad_row": "skip",  # the no-gold row (empty answer) is an unknown
            "spa": {"iterations": 2, "prompts": [source]},
        },
        "rl": "dpo",
        "datasets": [
            {
                "path": str(REPO / "axolotl_prefalign/data/spa_seed_example.jsonl"),
                "ds_type": "json",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],  # fmt: skip
        "output_dir": str(tmp_path / name),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "sequence_len": 256,
    }
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_the_loop_writes_a_gold_report_per_iteration_and_shows_it(
    tmp_path, tiny_model_dir, capsys
):
    from axolotl_prefalign.integrations.axolotl.spa_loop import run_from_config

    path, raw = _gold_yaml(tmp_path, tiny_model_dir)
    stages = GoldStages()
    summary = run_from_config(dict(raw), path, runner=stages)
    out = tmp_path / "out"
    assert stages.flags_files["iter_0"] is None  # seed DPO records nothing
    for i in (1, 2):
        assert stages.flags_files[f"iter_{i}"] == str(out / f"iter_{i}/spa_flags.jsonl")
        report = json.loads((out / f"iter_{i}/gold_report.json").read_text())
        assert report["iteration"] == i and report["checker"] == "choice"
        assert (report["pairs"], report["exactly_one"], report["unknown"]) == (10, 5, 3)
        assert report["self_labels"]["accuracy"] == pytest.approx(0.6)
        nf = report["noise_flags"]
        # Exactly-one pairs 0 1 2 3 9, wrong 1 3. DND flags {1}: P 1, R 1/2.
        assert (nf["with_dnd"]["precision"], nf["with_dnd"]["recall"]) == (1.0, 0.5)
        # Plain flags {0, 3}: P 1/2, R 1/2.
        assert (nf["without_dnd"]["precision"], nf["without_dnd"]["recall"]) == (
            0.5,
            0.5,
        )
        metrics = json.loads((out / f"iter_{i}/metrics.json").read_text())
        assert metrics["gold"] == summary["iterations"][i]["gold"]
        assert metrics["gold"]["flag_recall_dnd"] == 0.5
    assert "gold" not in summary["iterations"][0]
    table = card_table(summary["iterations"])
    assert "self-label accuracy" in table and "1.000 / 0.500" in table
    printed = capsys.readouterr().out
    assert "label_acc" in printed and "0.600" in printed


def test_adding_gold_does_not_make_finished_expansions_stale(tmp_path, tiny_model_dir):
    from axolotl_prefalign.integrations.axolotl.spa_loop import run_from_config

    shas = []
    for gold in (False, True):
        path, raw = _gold_yaml(tmp_path, tiny_model_dir, gold=gold, name=f"g{gold}")
        run_from_config(dict(raw), path, runner=GoldStages())
        state = json.loads((tmp_path / f"g{gold}/spa_state.json").read_text())
        shas.append(state["stages"]["iter_1/expand"]["sha"])
    assert shas[0] == shas[1]
    assert not (tmp_path / "gFalse/iter_1/gold_report.json").exists()
    assert (tmp_path / "gTrue/iter_1/gold_report.json").exists()


def test_card_table_without_gold_is_unchanged():
    rows = [{"iteration": 0, "expansion": None, "training": {}}]
    assert "self-label" not in card_table(rows)


# -- end to end: a real expansion on the tiny model ---------------------------------


def test_expansion_on_the_tiny_model_and_its_gold_report(
    tiny_model, tiny_tokenizer, tmp_path
):
    """Sampling is canned (a random model names no option), judging is real: the
    report's counts equal a recount from the pair shards the expansion wrote."""
    from peft import LoraConfig, get_peft_model

    from axolotl_prefalign.spa.expand import expand

    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model,
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        ),
    )  # fmt: skip
    path = _jsonl(tmp_path / "p.jsonl", _gold_rows(8))
    spa = SpaConfig(
        max_new_tokens=6,
        shard_size=3,
        judge_batch_size=2,
        iterations=1,
        prompts=[_source(path)],
    )
    (prompts,) = iteration_prompts(spa)
    answers = [_right(x) for x in "ABCD"]

    def generator(texts, seed):
        # Two answers per prompt: the right one and the next option.
        out = []
        for text in texts:
            k = int(text.split("Question ")[1].split("?")[0])
            out.append([answers[k % 4], answers[(k + 1) % 4]])
        return out

    d = tmp_path / "iter_1"
    expand(prompts, model, tiny_tokenizer, None, spa, d, 1, generator=generator)
    report = write_gold_report(spa, 1, d, prompts)
    assert json.loads((d / "gold_report.json").read_text()) == report
    pairs = list(read_shards(d / "pairs"))
    gold = dict(zip(prompts["index"], prompts["gold"], strict=True))
    right = [p["chosen"].startswith(gold[p["index"]]) for p in pairs]
    assert report["pairs"] == len(pairs) >= 6  # ties (equal reward) are dropped
    assert report["exactly_one"] == len(pairs) and report["unknown"] == 0
    assert report["self_labels"]["correct"] == sum(right)
    assert report["noise_flags"]["with_dnd"] is None and report["flag_files"] == []


@pytest.mark.slow
def test_real_loop_records_flags_and_reports_gold(spa_real_loop):
    """`axolotl prefalign spa` with real subprocess stages on the tiny model (shared
    with the loop's end-to-end test: conftest.spa_real_loop): the pair ids reach
    Axolotl's trainer through its RL data loader, the SPA loss records every trained
    pair's flags, and each iteration has its gold report."""
    proc = spa_real_loop.proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = spa_real_loop.out
    for i in (1, 2):
        d = out / f"iter_{i}"
        pairs = list(read_shards(d / "pairs"))
        flags = read_flags(d / "spa_flags.jsonl")
        assert set(flags) == {p["index"] for p in pairs}
        report = json.loads((d / "gold_report.json").read_text())
        assert report["pairs"] == len(pairs)
        counts = ("exactly_one", "both", "neither", "unknown")
        assert sum(report[k] for k in counts) == len(pairs)
        nf = report["noise_flags"]
        assert nf["missing"] == 0 and nf["recorded"] == report["exactly_one"]
        assert "gold" in json.loads((d / "metrics.json").read_text())
    assert not (out / "iter_0/spa_flags.jsonl").exists()
    assert "self-label accuracy" in (out / "iter_2/merged/README.md").read_text()
