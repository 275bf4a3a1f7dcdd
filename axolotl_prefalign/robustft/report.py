"""A RobustFT run's report: counts, quality against a gold column, and warnings.

`build_report` makes the report.json of a run; `format_report` (the terminal) and
`report_markdown` (the model card) render it. The checks below warn when the
experts look too weak for the data, the premise of docs/methods.md#robustft.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.config import RobustFTConfig
from .answers import answers_match, normalize_text
from .folder import ALL_FILE, TRAIN_FILE
from .select import label_counts

LOG = logging.getLogger("axolotl_prefalign")

WEAK_EXPERT_CLEAN_FRACTION = 0.2
ONE_ANSWER_SHARE = 0.9
ONE_ANSWER_MIN_ROWS = 10


def label_key(kind: str, label: str | None) -> str | None:
    """A label as the class it counts for (quota and label_distribution): the
    letter, the canonical number, or the normalised text."""
    if label is None:
        return None
    return normalize_text(label) if kind == "text" else str(label)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def label_distribution(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Label counts of the input rows (as labelled), of the relabelled candidates
    (their pseudo-labels) and of the kept training set (clean + selected)."""
    train = [r for r in rows if r["status"] in ("clean", "relabelled")]
    return {
        "input": label_counts([label_key(r["kind"], r["label"]) for r in rows]),
        "relabelled": label_counts(
            [
                label_key(r["kind"], r["new"])
                for r in rows
                if r["status"] != "clean" and r["new"] is not None
            ]
        ),
        "train": label_counts([label_key(r["kind"], r["new"]) for r in train]),
    }


def _distribution_rows(dist: Mapping[str, Mapping[str, int]]) -> list[list[Any]]:
    labels = sorted(set().union(*(set(v) for v in dist.values())))
    parts = ("input", "relabelled", "train")
    return [[label, *(dist[p].get(label, 0) for p in parts)] for label in labels]


def build_report(
    *,
    ds_len: int,
    skipped: int,
    info: Mapping[int, Mapping[str, Any]],
    experts: Sequence[str],
    settings: RobustFTConfig,
    source: str,
    rel_tol: float,
) -> dict[str, Any]:
    """Counts per status and, with a gold column, detection and relabel quality."""
    rows = list(info.values())
    noisy = [r for r in rows if r["status"] != "clean"]
    relabelled = [r for r in noisy if r["new"] is not None]
    selected = [r for r in rows if r["status"] == "relabelled"]
    report: dict[str, Any] = {
        "source": source,
        "rows_in": ds_len,
        "bad_rows_skipped": skipped,
        "rows_checked": len(rows),
        "clean": len(rows) - len(noisy),
        "noisy": len(noisy),
        "relabelled": len(relabelled),
        "selected": len(selected),
        "dropped": len(noisy) - len(selected),
        "train_rows": len(rows) - len(noisy) + len(selected),
        "experts": list(experts),
        "expert_scoring": settings.expert_scoring,
        "expert_training": settings.expert_training,
        "detection": settings.detection,
        "selection": settings.selection,
        "relabel": settings.relabel,
        "label_distribution": label_distribution(rows),
        "settings": settings.model_dump(mode="json"),
        "files": {"train": TRAIN_FILE, "all": ALL_FILE},
    }
    if settings.gold_field and rows:

        def right(r: Mapping[str, Any], key: str) -> bool:
            return answers_match(r[key], r["gold"], r["kind"], rel_tol)

        truly_noisy = [r for r in rows if not right(r, "label")]
        hit = [r for r in noisy if not right(r, "label")]
        train = [r for r in rows if r["status"] in ("clean", "relabelled")]
        report["gold"] = {
            "field": settings.gold_field,
            "noise_rate_in": _rate(len(truly_noisy), len(rows)),
            "detection_precision": _rate(len(hit), len(noisy)),
            "detection_recall": _rate(len(hit), len(truly_noisy)),
            "relabel_accuracy": _rate(
                sum(right(r, "new") for r in relabelled), len(relabelled)
            ),
            "selected_accuracy": _rate(
                sum(right(r, "new") for r in selected), len(selected)
            ),
            "label_accuracy_in": _rate(len(rows) - len(truly_noisy), len(rows)),
            "label_accuracy_out": _rate(
                sum(right(r, "new") for r in train), len(train)
            ),
            # RobustFT's premise: an expert right more often than the labels
            "expert_accuracy": expert_accuracy(rows, rel_tol),
        }
    return report


def vote_hits(
    rows: Sequence[Mapping[str, Any]], rel_tol: float
) -> dict[str, tuple[int, int]]:
    """Each expert/prompt's (right answers against the gold, rows it voted on); no
    answer counts as wrong."""
    hits: dict[str, list[bool]] = {}
    for r in rows:
        for v in r.get("votes") or []:
            key = f"{v['expert']}/{v['prompt']}"
            ok = answers_match(v["answer"], r["gold"], r["kind"], rel_tol)
            hits.setdefault(key, []).append(ok)
    return {k: (sum(v), len(v)) for k, v in sorted(hits.items())}


def label_hits(rows: Sequence[Mapping[str, Any]], rel_tol: float) -> tuple[int, int]:
    """(labels that match the gold, rows)."""
    right = sum(answers_match(r["label"], r["gold"], r["kind"], rel_tol) for r in rows)
    return right, len(rows)


def expert_accuracy(
    rows: Sequence[Mapping[str, Any]], rel_tol: float
) -> dict[str, float | None]:
    """Each expert/prompt's share of right answers against the gold (no answer
    counts as wrong), over the rows it voted on."""
    return {k: _rate(*hits) for k, hits in vote_hits(rows, rel_tol).items()}


def premise_warning(report: Mapping[str, Any]) -> str | None:
    """A warning when no expert beats the labels against the gold column."""
    gold = report.get("gold") or {}
    experts = {
        k: v for k, v in (gold.get("expert_accuracy") or {}).items() if v is not None
    }
    labels = gold.get("label_accuracy_in")
    if not experts or labels is None:
        return None
    best, acc = max(experts.items(), key=lambda kv: kv[1])
    if acc > labels:
        return None
    text = (
        f"no expert is right more often than the labels against {gold['field']!r}: "
        f"best {best} {100 * acc:.1f}% vs labels {100 * labels:.1f}%; relabelling "
        "by these experts cannot beat the input here (use a stronger expert)"
    )
    # Detection alone can still help: cleanlab drops only the rows an expert
    # contradicts confidently, so the kept rows can beat the input anyway.
    out = gold.get("label_accuracy_out")
    if out is not None and out > labels:
        text += (
            f"; the rows kept for training are still right more often than the "
            f"input ({100 * out:.1f}% vs {100 * labels:.1f}%)"
        )
    return text


# --------------------------------------------------------------- rendering


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a small aligned table."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"RobustFT: {report['source']}",
        f"  rows in               {report['rows_in']:>6}",
        f"  bad rows skipped      {report['bad_rows_skipped']:>6}",
        f"  clean                 {report['clean']:>6}",
        f"  noisy                 {report['noisy']:>6}",
        f"  relabelled            {report['relabelled']:>6}",
        f"  selected              {report['selected']:>6}",
        f"  dropped               {report['dropped']:>6}",
        f"  training rows         {report['train_rows']:>6}",
    ]
    if "expert_scoring" in report:
        lines.append(
            f"  scoring {report['expert_scoring']}, training "
            f"{report['expert_training']}, detection {report['detection']}, "
            + (
                "relabel off (flagged rows dropped)"
                if report.get("relabel") is False
                else f"selection {report['selection']}"
            )
        )
    if report.get("loglik_fallback_rows"):
        lines.append(f"  generated (no options) {report['loglik_fallback_rows']:>5}")
    gold = report.get("gold")
    if gold:
        lines += [
            f"  against gold column {gold['field']!r}:",
            f"  noise in input        {pct(gold['noise_rate_in']):>6}",
            f"  detection precision   {pct(gold['detection_precision']):>6}",
            f"  detection recall      {pct(gold['detection_recall']):>6}",
            f"  relabel accuracy      {pct(gold['relabel_accuracy']):>6}",
            f"  selected accuracy     {pct(gold['selected_accuracy']):>6}",
            f"  label accuracy in     {pct(gold['label_accuracy_in']):>6}",
            f"  label accuracy out    {pct(gold['label_accuracy_out']):>6}",
        ]
        for name, acc in (gold.get("expert_accuracy") or {}).items():
            lines.append(f"  expert {name:<22} {pct(acc):>6} right")
    dist = report.get("label_distribution")
    if dist:
        row = "  {:<14} {:>7} {:>11} {:>7}"
        lines.append(row.format("label", "in", "relabelled", "kept"))
        for label, n_in, n_rel, n_kept in _distribution_rows(dist):
            lines.append(row.format(label[:14], n_in, n_rel, n_kept))
    if "output_dir" in report:
        lines.append(f"  output: {report['output_dir']}")
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown tables (for the model card): counts, and detection
    precision / recall against the gold column when the run had one."""
    from ..core.model_card import markdown_table

    counts = [
        ("rows in", report["rows_in"]),
        ("bad rows skipped", report["bad_rows_skipped"]),
        ("clean (kept as labelled)", report["clean"]),
        ("noisy (detected)", report["noisy"]),
        ("relabelled", report["relabelled"]),
        ("relabelled and kept (lowest entropy)", report["selected"]),
        ("dropped", report["dropped"]),
        ("training rows (clean + kept)", report["train_rows"]),
    ]
    text = markdown_table(["RobustFT: " + str(report["source"]), "rows"], counts)
    gold = report.get("gold")
    if gold:
        rates = [
            ("noise in the input", gold["noise_rate_in"]),
            ("detection precision", gold["detection_precision"]),
            ("detection recall", gold["detection_recall"]),
            ("relabel accuracy", gold["relabel_accuracy"]),
            ("accuracy of the kept relabels", gold["selected_accuracy"]),
            ("label accuracy before", gold["label_accuracy_in"]),
            ("label accuracy after", gold["label_accuracy_out"]),
        ]
        text += "\n\n" + markdown_table(
            [f"against the gold column `{gold['field']}`", "rate"], rates
        )
    dist = report.get("label_distribution")
    if dist:
        text += "\n\n" + markdown_table(
            ["label", "input", "relabelled", "kept for training"],
            _distribution_rows(dist),
        )
    return text


# ------------------------------------------------------------------ checks


def warn_if_doubtful(report: Mapping[str, Any]) -> None:
    """Log when the experts look too weak for the data or lose to the labels."""
    _warn_if_experts_look_weak(report)
    premise = premise_warning(report)
    if premise:
        LOG.warning("robustft: %s", premise)


def _warn_if_experts_look_weak(report: Mapping[str, Any]) -> None:
    # RobustFT assumes experts that solve most questions. When they agree with
    # almost no label, relabelling is guesswork and can make the set worse.
    judged = report["clean"] + report["noisy"]
    if judged >= 4 and report["clean"] / judged < WEAK_EXPERT_CLEAN_FRACTION:
        LOG.warning(
            "robustft: the experts agreed with only %d of %d labels (%.0f%%): they "
            "may be too weak for this data, and relabelled rows may be worse than "
            "the input; check with prefalign.robustft.gold_field on a labelled "
            "sample or use a stronger expert model",
            report["clean"],
            judged,
            100 * report["clean"] / judged,
        )


ONE_ANSWER_SHARE = 0.9
ONE_ANSWER_MIN_ROWS = 10


def one_answer_experts(info: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Expert prompts that give (nearly) the same choice to every question.

    Such an expert "agrees" with every label that happens to be its favourite
    choice and with no other, so its clean/noisy verdicts follow the label, not the
    truth, and relabelling pushes the set towards that one answer. Counted over
    multiple-choice rows with an extracted answer: flagged when one answer has at
    least ONE_ANSWER_SHARE of them and a clearly larger share than the most common
    input label has (a set whose labels are mostly one answer is not evidence).
    """
    choice = [r for r in info.values() if r["kind"] == "choice"]
    labels = Counter(str(r["label"]) for r in choice)
    label_share = max(labels.values()) / len(choice) if choice else 1.0
    streams: dict[tuple[str, str], Counter[str]] = {}
    for r in choice:
        for v in r["votes"]:
            if v["answer"] is not None:
                key = (v["expert"], v["prompt"])
                streams.setdefault(key, Counter())[str(v["answer"])] += 1
    out = []
    for (expert, prompt), counts in sorted(streams.items()):
        n = sum(counts.values())
        answer, k = counts.most_common(1)[0]
        if n >= ONE_ANSWER_MIN_ROWS and k / n >= max(
            ONE_ANSWER_SHARE, label_share + 0.1
        ):
            out.append(
                {
                    "expert": expert,
                    "prompt": prompt,
                    "answer": answer,
                    "count": k,
                    "answered": n,
                    "top_label_share": round(label_share, 4),
                }
            )
            LOG.warning(
                "robustft: expert %r (%s prompt) answered %s to %d of %d "
                "multiple-choice questions while the most common label covers only "
                "%.0f%%: it is not telling the options apart, so its clean/noisy "
                "verdicts follow the label and relabelled rows drift to %s; use a "
                "stronger expert model (prefalign.robustft.experts)",
                expert,
                prompt,
                answer,
                k,
                n,
                100 * label_share,
                answer,
            )
    return out
