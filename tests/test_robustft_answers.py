"""RobustFT answer extraction: the usual formats, and the traps where nothing may be
invented (no answer, several answers, prose that starts with "A")."""

from __future__ import annotations

import pytest

from axolotl_prefalign.robustft.answers import (
    LabelError,
    answers_match,
    extract_answer,
    extract_choice,
    extract_number,
    extract_text,
    infer_kind,
    looks_numeric,
    normalize_text,
    parse_label,
    write_label,
)

CAPITALS = ["Berlin", "Paris", "Rome", "Madrid"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # The formats the prompts ask for, and the usual variants.
        ("Answer: B", "B"),
        ("answer: b", "B"),
        ("Answer: (B)", "B"),
        ("Answer: [C]", "C"),
        ("Answer:B", "B"),
        ("Answer: **B**", "B"),
        ("**Answer:** D", "D"),
        ("Final answer: c.", "C"),
        ("Reasoning...\nAnswer:\nB", "B"),
        ("Answer: B. Paris", "B"),
        ("Answer: B Paris", "B"),
        ("Answer: Paris", "B"),
        ("Answer: paris.", "B"),
        ("The answer is (B).", "B"),
        ("The correct answer is C because Rome is the capital.", "C"),
        ("the answer is b.", "B"),
        ("I pick **D**", "D"),
        ("B", "B"),
        ("B.", "B"),
        ("(A)", "A"),
        ("B. Paris", "B"),
        ("Paris is the capital of France.", "B"),
        # A final "Answer:" decides over earlier candidates.
        ("A looks right. Wait, no.\nAnswer: C", "C"),
        ("Answer: A\nReflection: that was wrong.\nAnswer: C", "C"),
        ("Between (A) and (D) the second fits.\nAnswer: D", "D"),
        # Traps: nothing found -> None, never a guess.
        ("", None),
        ("Sure, here is my answer.", None),
        ("I don't know.", None),
        ("Answer: I am not sure.", None),
        ("Answer: E", None),  # not among the 4 options
        ("Answer: A cat is not a city.", None),  # the article "A"
        ("answer is a cat", None),
        # Traps: several different answers -> None (ambiguous).
        ("A or B, hard to say.", None),
        ("I think (A) or (C).", None),
        ("**A** ... **C**", None),
        ("A. Berlin\nB. Paris\nC. Rome\nD. Madrid", None),  # echoed options
        ("A. 6\n\nThe answer is D. 4", None),
        # Negation is not parsed: no invented match.
        ("The answer is not A, it is C.", None),
        # Option text only in the first line: deeper it is often ruled out.
        ("Let me think.\nIt is not Berlin.", None),
    ],
)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, CAPITALS) == expected


def test_extract_choice_prefers_the_longer_option_that_contains_a_shorter_one():
    options = ["Paris", "Paris, Texas", "Rome"]
    assert extract_choice("Answer: Paris, Texas", options) == "B"
    assert extract_choice("Answer: Paris", options) == "A"


def test_extract_choice_without_options_allows_any_letter_but_no_prose():
    assert extract_choice("Answer: F") == "F"
    assert extract_choice("A quick thought") is None


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Answer: 42", 42.0),
        ("Answer: 1,234 km", 1234.0),
        ("Answer: $12.50", 12.5),
        ("answer: -3.5", -3.5),
        ("Answer: 30%", 30.0),
        ("Answer: 3/4", 0.75),
        ("Answer: 2.5e3 meters", 2500.0),
        ("The answer is 7 apples.", 7.0),
        ("It costs 12 dollars.", 12.0),
        ("So 2 + 3 = 5.\nAnswer: 5", 5.0),
        ("7 + 7 = 14, and 14 is the answer", None),  # 7 and 14: ambiguous
        ("2 + 3 = 5", None),
        ("no number here", None),
        ("Answer: many", None),
        ("The answer is 3. No wait, the answer is 4.", None),
    ],
)
def test_extract_number(reply, expected):
    assert extract_number(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Answer: Paris", "Paris"),
        ("Thinking...\n**Answer:** the Eiffel Tower\nmore", "the Eiffel Tower"),
        ("Paris is the capital.\nIt is big.", "Paris is the capital."),
        ("", None),
        ("  \n ... \n", None),
    ],
)
def test_extract_text(reply, expected):
    assert extract_text(reply) == expected


@pytest.mark.parametrize(
    ("a", "b", "kind", "match"),
    [
        ("B", "b", "choice", True),
        ("B", "C", "choice", False),
        ("1200", "1,200", "number", True),
        ("1200", "1210", "number", True),  # within 1e-2 relative
        ("1200", "1250", "number", False),
        ("0", "0", "number", True),
        ("The Eiffel Tower", "eiffel tower", "text", True),
        ("Paris is the capital.", "paris", "text", True),
        ("Parisian", "paris", "text", False),  # word-bounded containment
        ("", "", "text", False),
        (None, "B", "choice", False),
    ],
)
def test_answers_match(a, b, kind, match):
    assert answers_match(a, b, kind, rel_tol=1e-2) is match


def test_number_tolerance_is_configurable():
    assert answers_match("100", "101", "number", rel_tol=1e-2)
    assert not answers_match("100", "101", "number", rel_tol=1e-3)


def test_extract_answer_returns_canonical_numbers():
    assert extract_answer("Answer: 1,234.0 km", "number") == "1234"
    assert extract_answer("Answer: 0.5", "number") == "0.5"
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("x", "date")


def test_normalize_text_drops_case_punctuation_and_articles():
    assert normalize_text("  The  Eiffel-Tower, an icon! ") == "eiffeltower icon"


@pytest.mark.parametrize(
    ("label", "options", "expected"),
    [
        ("B", CAPITALS, ("B", "letter")),
        ("(b)", CAPITALS, ("B", "letter")),
        ("C.", CAPITALS, ("C", "letter")),
        ("rome", CAPITALS, ("C", "text")),
    ],
)
def test_parse_choice_label(label, options, expected):
    assert parse_label(label, "choice", options) == expected


@pytest.mark.parametrize(
    ("label", "kind", "options", "message"),
    [
        ("E", "choice", CAPITALS, r"answer letter 'E' is not among the 4 options"),
        ("London", "choice", CAPITALS, "neither an option letter"),
        ("B", "choice", None, "needs a list of options"),
        ("several 3 and 4", "number", None, "not a single number"),
        ("   ", "text", None, "empty"),
        (None, "text", None, "missing"),
        (True, "text", None, "must be text, got bool"),
        (["B"], "choice", CAPITALS, "must be text, got list"),
    ],
)
def test_parse_label_errors(label, kind, options, message):
    with pytest.raises(LabelError, match=message):
        parse_label(label, kind, options)


def test_parse_number_labels_with_units_and_json_numbers():
    assert parse_label("1,200 km", "number") == ("1200", "value")
    assert parse_label("$3.50", "number") == ("3.5", "value")
    assert parse_label(42, "number") == ("42", "value")


def test_infer_kind_and_write_back_in_the_labels_style():
    assert infer_kind("B", CAPITALS, "auto") == "choice"
    assert infer_kind("5 km", None, "auto") == "number"
    assert infer_kind("Paris", None, "auto") == "text"
    assert infer_kind("5", None, "text") == "text"
    assert looks_numeric("30%") and not looks_numeric("3 to 5")
    assert write_label("C", "choice", "text", CAPITALS) == "Rome"
    assert write_label("C", "choice", "letter", CAPITALS) == "C"
