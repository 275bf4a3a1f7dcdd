"""Answer extraction and comparison for RobustFT's checker.

The checker of noise detection: docs/methods.md#robustft-detect.

Three kinds of answer: `choice` (an option letter), `number` and `text`. The rules,
the same for every kind:

1. A final "Answer:" decides. Markers ("Answer:", "Final answer:", "**Answer:**")
   are read from the last one backwards; the first that parses is the answer.
2. Without a parsable marker every candidate in the text is collected; exactly one
   distinct candidate is the answer, none or several give None (ambiguous).
3. Nothing is ever guessed: no "first character of the reply" fallback (the
   official code's, which turns "Sure, ..." into the answer "S").

Answers are returned in a canonical string form (letter, number, text) so they can
be stored in JSON and compared with `answers_match`.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any, Literal

Kind = Literal["choice", "number", "text"]
KINDS: tuple[str, ...] = ("choice", "number", "text")

# "Answer:", "Final answer:", "**Answer:**", "answer :" (full-width colon too).
_MARKER = re.compile(r"(?i)\banswer\s*\**\s*[:：]\s*\**")
# "the answer is (B)", "correct option is: C", "my choice is b".
_IS_PHRASE = re.compile(r"(?i)\b(?:answer|option|choice)\s+is\s*[:：]?\s*\**\s*")
# "**B**", "**(B)**", "**B.**"
_BOLD_LETTER = re.compile(r"\*\*\s*[\(\[]?([A-Z])[\)\]]?\.?\s*\*\*")
# A line that starts with a letter: "B", "B.", "(B)", "B) Paris", "B: Paris". Every
# such line is a candidate, so a reply that lists the options is ambiguous.
_LEADING_LETTER = re.compile(
    r"^[ \t]*(?:[\(\[]([A-Z])[\)\]]|([A-Z])(?:[.):]|[ \t]*$))", re.MULTILINE
)
# Words after a bare letter that show it is the option, not the article "A"/"I".
_CONNECTORS = frozenset(
    "because since as which is was and or so for - – — : , . ; ! ? )".split()
)
_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"(?:\s*/\s*\d+(?!\.\d))?"
    r"|(?<![\w.])[-+−]?\.\d+"
)
_LABEL_NUMBER = re.compile(
    r"^\s*[$€£¥]?\s*(?P<n>[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
    r"(?:\s*/\s*\d+)?|[-+−]?\.\d+)\s*(?:%|[A-Za-zµ°]+\.?(?:\s*[A-Za-z]+\.?)?)?\s*$"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "“”‘’«»…")


class LabelError(ValueError):
    """A label (or gold answer) that cannot be read as the row's kind of answer."""


# --------------------------------------------------------------------------- text


def normalize_text(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _contains(hay: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {hay} "


def text_match(a: str, b: str) -> bool:
    """Normalised containment either way (word-bounded)."""
    na, nb = normalize_text(a), normalize_text(b)
    if not na or not nb:
        return False
    return _contains(na, nb) or _contains(nb, na)


def _marker_tails(text: str) -> list[str]:
    """What follows each "Answer:" marker, last marker first."""
    return [text[m.end() :] for m in reversed(list(_MARKER.finditer(text)))]


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().strip("*").strip()
        if line:
            return line
    return ""


def extract_text(text: str) -> str | None:
    """The free-text answer: the last "Answer:" line, else the first line."""
    for tail in _marker_tails(text):
        line = _first_line(tail)
        if normalize_text(line):
            return line
    line = _first_line(text)
    return line if normalize_text(line) else None


# ------------------------------------------------------------------------- choice


def letters(n: int) -> str:
    """The option letters A, B, ... for `n` options."""
    return string.ascii_uppercase[:n]


def _option_by_text(segment: str, options: Sequence[str]) -> str | None:
    """The one option whose text the segment equals, else contains; else None."""
    seg = normalize_text(segment)
    if not seg or not options:
        return None
    norm = [normalize_text(o) for o in options]
    equal = [i for i, o in enumerate(norm) if o and o == seg]
    if len(equal) == 1:
        return letters(len(options))[equal[0]]
    found = [i for i, o in enumerate(norm) if _contains(seg, o)]
    # An option contained in a longer one ("Paris" in "Paris, Texas") is not a
    # second answer when the longer one is there.
    found = [
        i
        for i in found
        if not any(j != i and _contains(norm[j], norm[i]) for j in found)
    ]
    if len(set(found)) == 1:
        return letters(len(options))[found[0]]
    return None


def _letter_at(tail: str, options: Sequence[str]) -> str | None:
    """An option letter at the start of `tail` ("B", "(b)", "B. Paris"), or None."""
    valid = letters(len(options)) if options else string.ascii_uppercase
    m = re.match(r"\s*(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Za-z])(?![A-Za-z0-9]))", tail)
    if not m:
        return None
    bracketed = m.group(1) is not None
    raw = m.group(1) or m.group(2)
    letter = raw.upper()
    if letter not in valid:
        return None
    if bracketed:
        return letter
    rest = tail[m.end() :]
    line = rest.split("\n", 1)[0]
    stripped = line.strip().strip("*").strip()
    if not stripped or stripped[0] in ".,;:!?)]":
        return letter
    # "B Paris": the option's own text follows.
    if options and normalize_text(stripped) == normalize_text(
        options[valid.index(letter)]
    ):
        return letter
    # "B because ..." is the option; "A cat ..." / "a cat" / "I think" is prose.
    word = stripped.split()[0].lower()
    if word in _CONNECTORS:
        return letter
    if raw.isupper() and raw not in ("A", "I"):
        return letter
    return None


def extract_choice(text: str, options: Sequence[str] = ()) -> str | None:
    """The option letter a reply gives, or None when absent or ambiguous."""
    for tail in _marker_tails(text):
        letter = _letter_at(tail, options)
        if letter is None:
            letter = _option_by_text(_first_line(tail), options)
        if letter is not None:
            return letter
    valid = letters(len(options)) if options else string.ascii_uppercase
    found: set[str] = set()
    for m in _IS_PHRASE.finditer(text):
        letter = _letter_at(text[m.end() :], options)
        if letter:
            found.add(letter)
    found.update(x for x in _BOLD_LETTER.findall(text) if x in valid)
    for m in _LEADING_LETTER.finditer(text):
        if (m.group(1) or m.group(2)) in valid:
            found.add(m.group(1) or m.group(2))
    if found:
        return found.pop() if len(found) == 1 else None
    # Option text only in the reply's first line ("Paris is the capital."): deeper
    # in a reasoning text an option is as often named to be ruled out.
    return _option_by_text(_first_line(text), options)


# ------------------------------------------------------------------------- number


def parse_number(token: str) -> float | None:
    """A number token ("1,234.5", "−3", "3/4", ".5e3") as a float, or None."""
    token = token.replace("−", "-").replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/", 1)
            return float(num) / float(den) if float(den) else None
        return float(token)
    except ValueError:
        return None


def format_number(value: float) -> str:
    """Canonical string of a number: "42" for integers, repr otherwise."""
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _numbers(text: str) -> list[float]:
    out = [parse_number(m.group(0)) for m in _NUMBER.finditer(text)]
    return [x for x in out if x is not None and math.isfinite(x)]


def _single(values: list[float]) -> float | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def extract_number(text: str) -> float | None:
    """The number a reply gives ("Answer: 1,234 km", "$12.50"), or None."""
    for tail in _marker_tails(text):
        nums = _numbers(_first_line(tail))
        if nums:
            return nums[0]
    said = []
    for m in _IS_PHRASE.finditer(text):
        nums = _numbers(text[m.end() :].split("\n", 1)[0])
        if nums:
            said.append(nums[0])
    if said:
        return _single(said)
    return _single(_numbers(text))


def looks_numeric(label: str) -> bool:
    """True for a label that is one number, maybe with a unit ("5 km", "$3", "30%")."""
    return bool(_LABEL_NUMBER.match(label))


# ---------------------------------------------------------------------- dispatch


def extract_answer(text: str, kind: Kind, options: Sequence[str] = ()) -> str | None:
    """The canonical answer of a reply for the given kind, or None."""
    if kind == "choice":
        return extract_choice(text, options)
    if kind == "number":
        value = extract_number(text)
        return None if value is None else format_number(value)
    if kind == "text":
        return extract_text(text)
    raise ValueError(f"unknown answer kind {kind!r}")


def answers_match(a: str | None, b: str | None, kind: Kind, rel_tol: float) -> bool:
    """Whether two canonical answers agree (None never agrees)."""
    if a is None or b is None:
        return False
    if kind == "choice":
        return a.strip().upper() == b.strip().upper()
    if kind == "number":
        x, y = parse_number(a), parse_number(b)
        if x is None or y is None:
            return False
        return math.isclose(x, y, rel_tol=rel_tol)
    return text_match(a, b)


def infer_kind(label: str, options: Sequence[str] | None, answer_type: str) -> Kind:
    """The row's kind: the configured one, or (auto) choice/number/text."""
    if answer_type != "auto":
        return answer_type  # type: ignore[return-value]
    if options:
        return "choice"
    return "number" if looks_numeric(label) else "text"


def label_text(value: Any) -> str:
    """A label value as text (numbers from JSON are allowed); LabelError otherwise."""
    if isinstance(value, bool) or value is None:
        raise LabelError("missing" if value is None else "must be text, got bool")
    if isinstance(value, (int, float)):
        return format_number(float(value))
    if not isinstance(value, str):
        raise LabelError(f"must be text, got {type(value).__name__}")
    if not value.strip():
        raise LabelError("empty")
    return value


def parse_label(
    value: Any, kind: Kind, options: Sequence[str] | None = None
) -> tuple[str, str]:
    """(canonical answer, style) of a dataset label; style is "letter" or "text"
    for choice rows (how to write a new label back), "value" otherwise."""
    text = label_text(value)
    if kind == "choice":
        if not options:
            raise LabelError("multiple-choice answer needs a list of options")
        valid = letters(len(options))
        bare = text.strip().strip("()[]").rstrip(".").strip()
        if len(bare) == 1 and bare.isalpha():
            if bare.upper() in valid:
                return bare.upper(), "letter"
            raise LabelError(
                f"answer letter {bare!r} is not among the {len(options)} options "
                f"({valid[0]}-{valid[-1]})"
            )
        norm = normalize_text(text)
        hits = [i for i, o in enumerate(options) if normalize_text(o) == norm]
        if len(hits) == 1:
            return valid[hits[0]], "text"
        raise LabelError(
            f"answer {text!r} is neither an option letter ({valid[0]}-{valid[-1]}) "
            "nor the text of exactly one option"
        )
    if kind == "number":
        m = _LABEL_NUMBER.match(text)
        value_ = parse_number(m.group("n")) if m else None
        if value_ is None:
            nums = _numbers(text)
            value_ = _single(nums)
        if value_ is None:
            raise LabelError(f"answer {text!r} is not a single number")
        return format_number(value_), "value"
    return text.strip(), "value"


def write_label(
    answer: str, kind: Kind, style: str, options: Sequence[str] | None
) -> str:
    """A canonical answer written back in the dataset's own style."""
    if kind == "choice" and style == "text" and options:
        return options[letters(len(options)).index(answer)]
    return answer
