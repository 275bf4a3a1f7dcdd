"""SPA's self-labels and noise flags against gold answers (multiple choice / QA).

SPA labels its own pairs and flags the least confident ones as noisy (c = 0,
docs/methods.md#spa-self-refinement); neither the paper nor its code measures how
often either is right.
Where each prompt has a correct answer, a sampled answer can be checked, and on the
pairs where exactly one of the two answers is right the self-label is either right
(chosen = the right one) or wrong. This module judges answers (`answer_is_right`),
and writes the per-iteration report (`gold_report`): the pair counts, the
self-label accuracy, and the precision / recall of the noise flags with and
without de-coupled noise detection, from the flags the SPA loss recorded during
that iteration's training (`core.preference.FlagRecorder`).

Checkers (`prefalign.spa.gold_checker`), all on SQuAD-normalised text:
- `choice`: the option the answer names, by letter ("B", "(B)", "B) ...",
  "Answer: B", "**B**") or by an option's text; exactly one option named, else
  unknown. The gold is a letter or (with options) an option's text.
- `contains`: the gold text appears in the answer (word-bounded).
- `exact`: the answer equals the gold text.
- `rule`: the gold column holds a rule the answer must keep, not an answer:
  `max_words: N` (at most N whitespace-separated words) or `answer_line` (its
  last non-empty line reads `Answer: <something>`). For format and length
  preferences, where a rule is the judge.
With options, a gold letter stands for its option's text under contains / exact.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CHECKERS = ("choice", "contains", "exact", "rule")
FLAGS_FILE = "spa_flags.jsonl"
REPORT_FILE = "gold_report.json"
# the kinds of noise flag a report scores, each with its tag in `gold_summary`'s keys
FLAG_KINDS = {"with_dnd": "dnd", "without_dnd": "plain"}

_PUNCT = str.maketrans("", "", string.punctuation + "“”‘’«»…")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# A whole answer that is one letter: "B", "(b)", "[B].", "B)".
_BARE = re.compile(r"^\s*\**\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:]?\s*\**\s*$")
# A bracketed letter anywhere: "(B)", "[c]".
_BRACKETED = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
# A line opening with "B." / "B)" / "B:" (an option written out).
_LEADING = re.compile(r"^[ \t>*-]*([A-Z])[.):]", re.MULTILINE)
# "Answer: B", "the answer is B", "option C", "choice is: D" (upper-case letter:
# "the answer is a cat" names no option).
_SAID = re.compile(
    r"(?i:\b(?:answer|option|choice))(?:\s+(?i:is))?\s*[:：]?\s*\**\s*([A-Z])"
    r"(?![A-Za-z0-9])"
)
# A lower-case letter only where nothing but punctuation follows: "answer: b."
_SAID_LOWER = re.compile(
    r"(?i:\b(?:answer|option|choice))(?:\s+(?i:is))?\s*[:：]?\s*\**\s*([a-z])"
    r"(?=\s*(?:[.,;!)\]*]|$))",
    re.MULTILINE,
)
_BOLD = re.compile(r"\*\*\s*([A-Z])\s*\*\*")
# "Answer:" / "Final answer:" / "**Answer:**": the last one decides.
_MARKER = re.compile(r"(?i)\banswer\s*\**\s*[:：]")


class GoldError(ValueError):
    """A gold answer (or its options) that cannot be used with the checker."""


# -- rules (gold_checker: rule) ---------------------------------------------------

_MAX_WORDS = re.compile(r"^\s*max_words\s*:\s*(\d+)\s*$")
_ANSWER_LINE = re.compile(r"^\s*answer_line\s*$")
# The last non-empty line of an answer that keeps `answer_line`.
_FINAL_ANSWER = re.compile(r"^\s*\**Answer\**\s*:\s*\**\s*\S")
RULES = "max_words: N | answer_line"


def resolve_rule(value: Any) -> str:
    """A rule in its canonical spelling (`max_words: 30`, `answer_line`)."""
    if not isinstance(value, str):
        raise GoldError(f"a rule must be text ({RULES}), got {value!r}")
    words = _MAX_WORDS.match(value)
    if words:
        if int(words.group(1)) < 1:
            raise GoldError(f"max_words must be at least 1, got {value!r}")
        return f"max_words: {int(words.group(1))}"
    if _ANSWER_LINE.match(value):
        return "answer_line"
    raise GoldError(f"{value!r} is not a rule ({RULES})")


def keeps_rule(answer: str, rule: str) -> bool:
    """Whether an answer keeps a resolved rule."""
    words = _MAX_WORDS.match(rule)
    if words:
        return len(answer.split()) <= int(words.group(1))
    lines = [line for line in answer.splitlines() if line.strip()]
    return bool(lines) and bool(_FINAL_ANSWER.match(lines[-1]))


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def _contains(hay: str, needle: str) -> bool:
    # Word-bounded: "4" is not in "14".
    return bool(needle) and f" {needle} " in f" {hay} "


def letters(n: int) -> str:
    """The option letters A, B, ... of `n` options."""
    return string.ascii_uppercase[:n]


def check_options(value: Any) -> list[str]:
    """A row's options as a list of texts; GoldError otherwise."""
    if not isinstance(value, list | tuple) or not value:
        raise GoldError(f"options must be a non-empty list of texts, got {value!r}")
    if len(value) > 26 or not all(isinstance(o, str) and o.strip() for o in value):
        raise GoldError(f"options must be 1-26 non-empty texts, got {value!r}")
    return [o.strip() for o in value]


def resolve_gold(value: Any, options: Sequence[str] | None, checker: str) -> str:
    """The gold in the checker's terms: an option letter (choice), a text, or a
    rule (rule); GoldError when it names no option or is empty."""
    if checker == "rule":
        return resolve_rule(value)
    if isinstance(value, bool) or value is None:
        raise GoldError("missing" if value is None else "must be text, got bool")
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise GoldError(f"must be a non-empty text, got {value!r}")
    bare = _BARE.match(value)
    letter = bare.group(1).upper() if bare else None
    if options:
        valid = letters(len(options))
        if letter is None:
            norm = normalize(value)
            hits = [k for k, o in enumerate(options) if normalize(o) == norm]
            if len(hits) != 1:
                raise GoldError(
                    f"{value!r} is neither an option letter ({valid[0]}-{valid[-1]}) "
                    "nor the text of exactly one option"
                )
            letter = valid[hits[0]]
        elif letter not in valid:
            raise GoldError(f"letter {letter!r} is not among options {valid}")
        return letter if checker == "choice" else options[valid.index(letter)]
    if checker == "choice":
        if letter is None:
            raise GoldError(
                f"{value!r} is not an option letter; give gold_options_field to "
                "match option texts"
            )
        return letter
    if not normalize(value):
        # Only punctuation or articles: nothing would ever contain or equal it.
        raise GoldError(f"{value!r} is empty once normalised")
    return value.strip()


def named_option(answer: str, options: Sequence[str] = ()) -> str | None:
    """The one option letter an answer names (by letter or option text), or None
    when it names none or several."""
    valid = letters(len(options)) if options else string.ascii_uppercase
    markers = list(_MARKER.finditer(answer))
    if markers:
        # An explicit final answer decides (earlier lines may list the options):
        # the first line after the last "Answer:".
        rest = answer[markers[-1].end() :].lstrip(" \t\n*")
        answer = "Answer: " + rest.split("\n", 1)[0].strip()
    bare = _BARE.match(answer)
    if bare:
        letter = bare.group(1).upper()
        return letter if letter in valid else None
    named = {m.upper() for m in _BRACKETED.findall(answer)}
    named.update(m.upper() for m in _SAID_LOWER.findall(answer))
    for pattern in (_LEADING, _SAID, _BOLD):
        named.update(pattern.findall(answer))
    named &= set(valid)
    text = normalize(answer)
    norm = [normalize(o) for o in options]
    found = [k for k, o in enumerate(norm) if _contains(text, o)]
    # An option inside a longer option that is there ("Paris" in "Paris, Texas")
    # is not a second answer.
    inside = {k for k in found for j in found if j != k and _contains(norm[j], norm[k])}
    found = [k for k in found if k not in inside]
    named.update(valid[k] for k in found)
    return named.pop() if len(named) == 1 else None


def answer_is_right(
    answer: str, gold: str, options: Sequence[str] | None, checker: str
) -> bool | None:
    """Whether an answer is right against a resolved gold; None = unknown."""
    if checker == "choice":
        letter = named_option(answer, options or ())
        return None if letter is None else letter == gold
    if checker == "contains":
        return _contains(normalize(answer), normalize(gold))
    if checker == "exact":
        return normalize(answer) == normalize(gold)
    if checker == "rule":
        return keeps_rule(answer, gold)
    raise ValueError(f"gold_checker must be one of {CHECKERS}, got {checker!r}")


# -- the noise flags the SPA loss recorded ---------------------------------------


def flag_files(flags_file: Path) -> list[Path]:
    """The flags file and its per-process siblings (`<name>.rank<k>`)."""
    return sorted(
        p
        for p in [flags_file, *flags_file.parent.glob(flags_file.name + ".rank*")]
        if p.exists()
    )


def read_flags(flags_file: Path) -> dict[int, dict[str, Any]]:
    """Each pair's last recorded flags, by pair id, from all processes' files."""
    flags: dict[int, dict[str, Any]] = {}
    for path in flag_files(flags_file):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                flags[int(record["pair_id"])] = record
    return flags


# -- the report ------------------------------------------------------------------


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _flag_rates(pairs: int, flagged: int, wrong: int, hits: int) -> dict[str, Any]:
    return {
        "pairs": pairs,
        "flagged": flagged,
        "wrong": wrong,
        "flagged_wrong": hits,
        "precision": _rate(hits, flagged),
        "recall": _rate(hits, wrong),
        "flagged_fraction": _rate(flagged, pairs),
    }


def flag_scores(flagged: Sequence[bool], wrong: Sequence[bool]) -> dict[str, Any]:
    """Precision (flagged pairs whose label is wrong / flagged) and recall (wrong
    labels flagged / wrong labels) of noise flags, with the counts."""
    hits = sum(f and w for f, w in zip(flagged, wrong, strict=True))
    return _flag_rates(len(flagged), sum(flagged), sum(wrong), hits)


def gold_report(
    prompts: Iterable[Mapping[str, Any]],
    pairs: Iterable[Mapping[str, Any]],
    checker: str,
    flags: Mapping[int, Mapping[str, Any]] | None = None,
    iteration: int | None = None,
) -> dict[str, Any]:
    """Counts and rates of one iteration's pairs against the prompts' gold.

    `prompts` rows have `index`, `gold` (resolved, or None when the row has none)
    and `options`; `pairs` are the expansion's rows (`index`, `chosen`,
    `rejected`); `flags` the recorded noise flags by pair id (None: none recorded).
    """
    gold = {int(p["index"]): p for p in prompts}
    counts = Counter({"exactly_one": 0, "both": 0, "neither": 0, "unknown": 0})
    unknown: Counter = Counter()
    one: list[tuple[int, bool]] = []  # (pair id, self-label right) on exactly-one pairs
    total = 0
    for pair in pairs:
        total += 1
        pid = int(pair["index"])
        row = gold.get(pid)
        if row is None or row.get("gold") is None:
            counts["unknown"] += 1
            unknown["no_gold"] += 1
            continue
        options = row.get("options") or None
        right = [
            answer_is_right(pair[side], row["gold"], options, checker)
            for side in ("chosen", "rejected")
        ]
        if None in right:
            counts["unknown"] += 1
            for side, r in zip(("chosen", "rejected"), right, strict=True):
                if r is None:
                    unknown[f"{side}_unknown"] += 1
            continue
        if right[0] and right[1]:
            counts["both"] += 1
        elif not (right[0] or right[1]):
            counts["neither"] += 1
        else:
            counts["exactly_one"] += 1
            one.append((pid, right[0]))
    correct = sum(r for _, r in one)
    report: dict[str, Any] = {
        "iteration": iteration,
        "checker": checker,
        "pairs": total,
        **{k: counts[k] for k in ("exactly_one", "both", "neither", "unknown")},
        "unknown_reasons": dict(unknown),
        "self_labels": {
            "pairs": len(one),
            "correct": correct,
            "wrong": len(one) - correct,
            "accuracy": _rate(correct, len(one)),
        },
        "noise_flags": noise_flag_report(one, flags),
    }
    return report


def noise_flag_report(
    one: Sequence[tuple[int, bool]], flags: Mapping[int, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """Precision / recall of the recorded flags (c = 0) on the exactly-one pairs,
    with DND (the trainer's c when DND was on) and without (c from the plain DPO
    margins β·h and their own τ)."""
    if not flags:
        return {
            "recorded": 0,
            "missing": len(one),
            **dict.fromkeys(FLAG_KINDS),
            "note": "no flags recorded: the stage did not train with prefalign.loss: "
            "spa through the Axolotl trainer (LLaMA-Factory's batches carry no "
            "pair id)",
        }
    seen = [(flags[pid], right) for pid, right in one if pid in flags]
    wrong = [not right for _, right in seen]
    plain = [not rec["confident_plain"] for rec, _ in seen]
    with_dnd = [rec.get("confident_dnd") for rec, _ in seen]
    lambdas = sorted({rec.get("dnd_lambda", 0.0) for rec in flags.values()})
    out: dict[str, Any] = {
        "recorded": len(seen),
        "missing": len(one) - len(seen),
        "dnd_lambda": lambdas[0] if len(lambdas) == 1 else lambdas,
        "with_dnd": None,
        "without_dnd": flag_scores(plain, wrong),
    }
    if seen and all(c is not None for c in with_dnd):
        out["with_dnd"] = flag_scores([not c for c in with_dnd], wrong)
    elif seen:
        out["note"] = "DND was off in this stage (λ = 0): only the plain flags exist"
    return out


def gold_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers of a gold report that go into the loop's table and card."""
    flags = report["noise_flags"]

    def score(kind: str, key: str) -> float | None:
        return (flags.get(kind) or {}).get(key)

    out = {
        "pairs": report["pairs"],
        "exactly_one": report["exactly_one"],
        "unknown": report["unknown"],
        "self_label_accuracy": report["self_labels"]["accuracy"],
    }
    for kind, tag in FLAG_KINDS.items():
        out[f"flag_precision_{tag}"] = score(kind, "precision")
        out[f"flag_recall_{tag}"] = score(kind, "recall")
    return out


# the pair counts of a report, summed by `pool_reports`
REPORT_COUNTS = ("pairs", "exactly_one", "both", "neither", "unknown")
_FLAG_COUNTS = ("pairs", "flagged", "wrong", "flagged_wrong")


def pool_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs' reports of one iteration (seeds, say) as one report: summed
    counts and the rates of the sums. A run has few exactly-one pairs, so a mean of
    per-run rates would weigh a run of 1 pair like one of 10.

    Each report needs the `REPORT_COUNTS` it has (a missing one counts 0),
    `self_labels` (`pairs`, `correct`) and `noise_flags` (`with_dnd` /
    `without_dnd`: `pairs`, `flagged`, `wrong`, `flagged_wrong`, or None). A kind
    of flag none of the reports recorded stays None."""
    pairs = sum(r["self_labels"]["pairs"] for r in reports)
    correct = sum(r["self_labels"]["correct"] for r in reports)
    flags: dict[str, Any] = {}
    for kind in FLAG_KINDS:
        got = [f for r in reports if (f := (r.get("noise_flags") or {}).get(kind))]
        sums = [sum(f[k] for f in got) for k in _FLAG_COUNTS]
        flags[kind] = _flag_rates(*sums) if got else None
    return {
        "runs": len(reports),
        **{k: sum(r.get(k, 0) for r in reports) for k in REPORT_COUNTS},
        "self_labels": {
            "pairs": pairs,
            "correct": correct,
            "wrong": pairs - correct,
            "accuracy": _rate(correct, pairs),
        },
        "noise_flags": flags,
    }


def rate_counts(report: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The (numerator, denominator) behind each rate of `gold_summary(report)`."""
    labels = report["self_labels"]
    out = {"self_label_accuracy": (labels["correct"], labels["pairs"])}
    for kind, tag in FLAG_KINDS.items():
        f = report["noise_flags"].get(kind)
        if f is not None:
            out[f"flag_precision_{tag}"] = (f["flagged_wrong"], f["flagged"])
            out[f"flag_recall_{tag}"] = (f["flagged_wrong"], f["wrong"])
    return out
