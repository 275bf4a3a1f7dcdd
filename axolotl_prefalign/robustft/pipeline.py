"""RobustFT end to end: detect → relabel → review → select (METHODS.md §3).

`denoise_dataset` runs the stages over one `datasets.Dataset` and writes, under one
output folder:

    predictions/NN-<expert>/  shards + manifest: each expert's plain / reasoning replies
                              (and option log-likelihoods with expert_scoring: loglik)
    crossfit/fold-N/          (expert_training: crossfit) fold N's out-of-fold option
                              probabilities; its manifest lists the rows it trained on
    relabel/                  shards + manifest: context-enhanced replies and their H;
                              neighbours.json: the retrieved clean examples
    review/                   shards + manifest: the review replies (review: model)
    denoised.jsonl            the training set D_clean ∪ D_select, with provenance
    all.jsonl                 every input row, dropped and skipped ones included
    report.json               counts (and precision/recall against a gold column)

Every stage writes atomic shards, so an interrupted run resumes where it stopped;
`report.json` is written last and marks the folder complete. The folder name holds a
hash of the `prefalign.robustft` settings, the models and the input rows, so the
`axolotl prefalign denoise` command and the `axolotl_prefalign.robustft` dataset type
find the same output.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..core.config import RobustFTConfig
from ..core.local_data import DataFileError, LocalRows, read_entry
from ..core.rows import RowChecker, text_problem
from ..core.shards import (
    ShardWriter,
    atomic_write_json,
    atomic_write_text,
    main_process_only,
)
from .answers import (
    LabelError,
    answers_match,
    infer_kind,
    label_text,
    normalize_text,
    parse_label,
    write_label,
)
from .crossfit import FoldFit, LoraCrossfit, crossfit_option_probs
from .detect import DetectionError, detect_noise
from .predict import Predictor, Scorer, load_model_predictor, predict_rows
from .relabel import (
    Encoder,
    load_encoder,
    relabel_noisy,
    retrieve_examples,
    review_labels,
)
from .select import label_counts, select_by_entropy, select_by_quota

LOG = logging.getLogger("axolotl_prefalign")

DATASET_TYPE = "axolotl_prefalign.robustft"
TRAIN_FILE, ALL_FILE, REPORT_FILE = "denoised.jsonl", "all.jsonl", "report.json"
NEIGHBOURS_FILE = "neighbours.json"
BASE_EXPERT = "base"
CROSSFIT_EXPERT = "crossfit"
# Settings added after the first release: left out of the cache key at their
# defaults, so folders written before them keep their names.
KEY_DEFAULTS_OMITTED = (
    "expert_scoring",
    "expert_training",
    "crossfit_folds",
    "crossfit_epochs",
    "crossfit_learning_rate",
    "crossfit_lora_r",
    "crossfit_batch_size",
    "seed",
    "detection",
    "selection",
)
PREFIX = "robustft_"


# A Dataset, or rows read by local_data (plain dicts, possibly of mixed types).
Rows = Dataset | Sequence[Mapping[str, Any]]


class RobustFTError(RuntimeError):
    """A RobustFT run that cannot go on (bad input, nothing kept, ...)."""


@dataclass
class DenoiseResult:
    """What one denoising run produced."""

    out_dir: Path
    train: Dataset
    all_rows: Dataset
    report: dict[str, Any]


# ------------------------------------------------------------------ input rows


def prepare_rows(
    ds: Rows, settings: RobustFTConfig, checker: RowChecker
) -> tuple[Dataset, dict[int, str]]:
    """Validate every row and parse its label: (rows to denoise, skipped idx → why).

    Rows get `idx` (position in `ds`), `question`, `options`, `kind`, `label`
    (canonical answer), `style` (how to write a label back) and `gold`.
    """
    f = settings.fields
    has_options = f.options is not None and f.options in _column_names(ds)
    out: list[dict[str, Any]] = []
    skipped: dict[int, str] = {}

    def bad(idx: int, fld: str, problem: str) -> None:
        checker.bad(idx, fld, problem)  # raises under on_bad_row: error
        skipped[idx] = f"{fld}: {problem}"

    for idx, row in enumerate(ds):
        problem = text_problem(row, f.question)
        if problem:
            bad(idx, f.question, problem)
            continue
        try:
            label = label_text(row.get(f.answer))
        except LabelError as err:
            bad(idx, f.answer, str(err))
            continue
        options = row.get(f.options) if has_options else None
        if options is not None:
            problem = _options_problem(options)
            if problem:
                bad(idx, f.options, problem)
                continue
            options = [o.strip() for o in options]
        kind = infer_kind(label, options, settings.answer_type)
        if kind == "choice" and not options:
            where = f"column {f.options!r}" if f.options else "an options column"
            bad(idx, f.options or f.answer, f"answer_type choice needs {where}")
            continue
        try:
            canonical, style = parse_label(label, kind, options)
        except LabelError as err:
            bad(idx, f.answer, str(err))
            continue
        gold = None
        if settings.gold_field:
            try:
                gold, _ = parse_label(row.get(settings.gold_field), kind, options)
            except LabelError as err:
                bad(idx, settings.gold_field, str(err))
                continue
        out.append(
            {
                "idx": idx,
                "question": row[f.question].strip(),
                "options": options,
                "kind": kind,
                "label": canonical,
                "style": style,
                "gold": gold,
            }
        )
    checker.report()
    return Dataset.from_list(out) if out else Dataset.from_dict({"idx": []}), skipped


def _options_problem(options: Any) -> str | None:
    if not isinstance(options, list):
        return f"options must be a list of texts, got {type(options).__name__}"
    if len(options) < 2:
        return f"needs at least 2 options, got {len(options)}"
    if len(options) > 26:
        return f"at most 26 options (letters A-Z), got {len(options)}"
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            return f"option {i} must be non-empty text, got {opt!r}"
    return None


def load_input(ds_cfg: Mapping[str, Any], on_bad_row: str = "error") -> LocalRows:
    """The rows of a local file or folder named by a `datasets:` entry, each with
    its line (no hub or remote datasets)."""
    try:
        return read_entry(ds_cfg, on_bad_row)
    except DataFileError as err:
        raise RobustFTError(
            f"RobustFT reads local .json/.jsonl/.parquet/.csv data only: {err}"
        ) from None


def _column_names(ds: Rows) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is not None:
        return list(names)
    return list(dict.fromkeys(k for row in ds for k in row))


# ------------------------------------------------------------- output folder


def expert_list(
    settings: RobustFTConfig, base_model: str | None
) -> list[tuple[str, str]]:
    """(name, path) of the experts: the configured ones, else the base model."""
    if settings.experts:
        return [(p, p) for p in settings.experts]
    if not base_model:
        raise RobustFTError("RobustFT needs base_model (or prefalign.robustft.experts)")
    return [(BASE_EXPERT, base_model)]


def cache_key(
    settings: RobustFTConfig,
    ds: Rows,
    *,
    base_model: str | None,
    on_bad_row: str,
) -> str:
    """Hash of the settings, models and input rows that name an output folder."""
    h = hashlib.sha256()
    dumped = settings.model_dump(mode="json", exclude={"output_dir"})
    for name in KEY_DEFAULTS_OMITTED:
        if dumped[name] == RobustFTConfig.model_fields[name].default:
            del dumped[name]
    meta = {
        "robustft": dumped,
        "base_model": base_model,
        "on_bad_row": on_bad_row,
        "version": 1,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    # Only the columns RobustFT reads, missing ones as None: the rows of a file
    # read line by line and the same file loaded by datasets (Axolotl's dataset
    # type) then give the same key.
    f = settings.fields
    used = [f.question, f.answer, f.options, settings.gold_field]
    used = sorted({c for c in used if c})
    for row in ds:
        h.update(json.dumps([row.get(c) for c in used], default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def output_folder(parent: str | Path, source: str, key: str) -> Path:
    """`<parent>/<input stem>-<key[:12]>`."""
    stem = Path(source).name.split(".")[0] or "dataset"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem)
    return Path(parent).expanduser() / f"{stem}-{key[:12]}"


def default_parent(cfg: Mapping[str, Any], settings: RobustFTConfig) -> Path:
    """`prefalign.robustft.output_dir`, else `<output_dir>/robustft`."""
    if settings.output_dir:
        return Path(settings.output_dir).expanduser()
    return Path(cfg.get("output_dir") or "./model-out") / "robustft"


# -------------------------------------------------------------------- models


class _Models:
    """Loads a model on first use and keeps one at a time (experts never share
    memory); a stage whose shards are all written never loads its model."""

    def __init__(self, load: Callable[[str], Predictor]):
        self.load = load
        self.path: str | None = None
        self.current: Predictor | None = None

    def predictor(self, path: str) -> Predictor:
        def call(prompts, **kwargs):
            if self.path != path:
                self.release()
                self.current, self.path = self.load(path), path
            return self.current(prompts, **kwargs)

        return call

    def scorer(self, path: str) -> Scorer:
        """The option log-likelihoods of the model at `path` (its predictor's
        `reply_logliks`)."""

        def call(prompts, replies):
            if self.path != path:
                self.release()
                self.current, self.path = self.load(path), path
            score = getattr(self.current, "reply_logliks", None)
            if score is None:
                raise RobustFTError(
                    "expert_scoring: loglik needs a predictor with reply_logliks "
                    f"(got {type(self.current).__name__})"
                )
            return score(prompts, replies)

        return call

    def release(self) -> None:
        if self.current is None:
            return
        self.current = self.path = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name.rstrip("/")).name or name)[:60]


# ------------------------------------------------------------------- the run


def denoise_dataset(
    ds: Rows,
    settings: RobustFTConfig,
    out_dir: str | Path,
    *,
    base_model: str | None,
    source: str = "dataset",
    on_bad_row: str = "error",
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
    load_in_4bit: bool = False,
    lines: Sequence[int | None] | None = None,
    crossfit_fit: FoldFit | None = None,
) -> DenoiseResult:
    """Detect, relabel and select the noisy rows of `ds`; resumable in `out_dir`.

    `lines` (each row's line in a JSON-lines file) lets errors name the line.

    `load_predictor(path)`, `encoder` and `crossfit_fit` replace the local HF
    models, the sentence encoder and the per-fold LoRA training (tests pass fixed
    replies, a bag-of-words embedding and recorded folds).
    """
    out_dir = Path(out_dir)
    if (out_dir / REPORT_FILE).exists():
        LOG.info("robustft: %s is complete; reusing it", out_dir)
        return load_result(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checker = RowChecker(source, on_bad_row, lines=lines)
    rows, skipped = prepare_rows(ds, settings, checker)
    experts = expert_list(settings, base_model)
    relabel_path = base_model or experts[0][1]
    crossfit = settings.expert_training == "crossfit"
    if crossfit:
        _check_all_choice(rows, "expert_training: crossfit")
    fallback = _loglik_fallback(rows, settings)
    if load_predictor is None:

        def load_predictor(path: str) -> Predictor:
            from ..core.models import resolve_model_path

            return load_model_predictor(
                resolve_model_path(_alias(path)),
                batch_size=settings.batch_size,
                load_in_4bit=load_in_4bit,
            )

    models = _Models(load_predictor)
    loglik = settings.expert_scoring == "loglik"
    try:
        predictions = {}
        for i, (name, path) in enumerate(experts):
            meta = {"stage": "predict", "expert": name}
            if loglik:
                meta["scoring"] = "loglik"
            writer = ShardWriter(
                out_dir / "predictions" / f"{i:02d}-{_slug(name)}", meta=meta
            )
            predictions[name] = predict_rows(
                rows,
                models.predictor(path),
                reasoning=settings.reasoning,
                max_new_tokens=settings.max_new_tokens,
                answer_max_new_tokens=settings.answer_max_new_tokens,
                batch_size=settings.batch_size,
                writer=writer,
                desc=f"predict ({name})",
                scorer=models.scorer(path) if loglik else None,
            )
        if crossfit:
            models.release()  # the folds load their own copy of the base model
            predictions[CROSSFIT_EXPERT] = _crossfit(
                rows, settings, out_dir, relabel_path, crossfit_fit, load_in_4bit
            )
        try:
            checked = detect_noise(
                rows,
                predictions,
                agreement=settings.agreement,
                rel_tol=settings.number_rel_tol,
                detection=settings.detection,
                probs_expert=CROSSFIT_EXPERT if crossfit else None,
            )
        except DetectionError as err:
            raise RobustFTError(str(err)) from None
        noisy_mask = checked["noisy"] if len(checked) else []
        clean = checked.select([i for i, n in enumerate(noisy_mask) if not n])
        noisy = checked.select([i for i, n in enumerate(noisy_mask) if n])
        reviewed = _relabel(
            noisy, clean, settings, models.predictor(relabel_path), encoder, out_dir
        )
    finally:
        models.release()
    candidates = (
        reviewed.filter(lambda r: r["new_label"] is not None)
        if len(reviewed)
        else reviewed
    )
    quotas = None
    if not len(candidates):
        selected = candidates
    elif settings.selection == "quota":
        keyed = candidates.add_column(
            "label_key",
            [label_key(r["kind"], r["new_label"]) for r in candidates],
        )
        selected, quotas = select_by_quota(
            keyed,
            settings.select_ratio,
            [label_key(r["kind"], r["label"]) for r in rows],
            label_column="label_key",
        )
    else:
        selected = select_by_entropy(candidates, settings.select_ratio)
    extra = {"loglik_fallback_rows": fallback, "selection_quotas": quotas}
    result = _write_outputs(
        ds,
        settings,
        out_dir,
        clean,
        reviewed,
        selected,
        skipped,
        [*experts, *([(CROSSFIT_EXPERT, relabel_path)] if crossfit else [])],
        source,
        extra,
    )
    LOG.info("robustft: wrote %s", out_dir)  # the caller shows the report
    return result


def label_key(kind: str, label: str | None) -> str | None:
    """A label as the class it counts for (quota and label_distribution): the
    letter, the canonical number, or the normalised text."""
    if label is None:
        return None
    return normalize_text(label) if kind == "text" else str(label)


def _check_all_choice(rows: Dataset, what: str) -> None:
    other = [r["idx"] for r in rows if r["kind"] != "choice"] if len(rows) else []
    if other:
        raise RobustFTError(
            f"{what} needs multiple-choice rows (an options column); {len(other)} "
            f"row(s) are number or text answers (first: row {other[0]})"
        )


def _loglik_fallback(rows: Dataset, settings: RobustFTConfig) -> int | None:
    """Rows that expert_scoring: loglik cannot score (no options): they fall back
    to the generated plain answer; logged once, counted in the report."""
    if settings.expert_scoring != "loglik":
        return None
    n = sum(1 for r in rows if r["kind"] != "choice") if len(rows) else 0
    if n:
        LOG.warning(
            "robustft: expert_scoring loglik scores multiple-choice rows only; %d of "
            "%d row(s) are number/text answers and use the generated plain answer",
            n,
            len(rows),
        )
    return n


def _crossfit(
    rows: Dataset,
    settings: RobustFTConfig,
    out_dir: Path,
    base_path: str,
    fit: FoldFit | None,
    load_in_4bit: bool,
) -> Dataset:
    """The cross-fitted expert's out-of-fold option probabilities (crossfit/)."""
    default = None
    if fit is None:
        from ..core.models import resolve_model_path

        fit = default = LoraCrossfit(
            resolve_model_path(_alias(base_path)),
            epochs=settings.crossfit_epochs,
            learning_rate=settings.crossfit_learning_rate,
            lora_r=settings.crossfit_lora_r,
            batch_size=settings.crossfit_batch_size,
            seed=settings.seed,
            score_batch_size=settings.batch_size,
            load_in_4bit=load_in_4bit,
        )
    try:
        oof = crossfit_option_probs(
            rows,
            fit,
            folds=settings.crossfit_folds,
            seed=settings.seed,
            out_dir=out_dir / "crossfit",
        )
    except ValueError as err:
        raise RobustFTError(str(err)) from None
    finally:
        if default is not None:
            default.release()
    return oof


def _alias(path: str) -> str:
    return "default" if path == "prefalign:default" else path


def _relabel(
    noisy: Dataset,
    clean: Dataset,
    settings: RobustFTConfig,
    predictor: Predictor,
    encoder: Encoder | None,
    out_dir: Path,
) -> Dataset:
    """Retrieval, context-enhanced relabelling and review of the noisy rows."""
    if len(noisy) == 0:
        return noisy
    noisy = _with_neighbours(noisy, clean, settings, encoder, out_dir)
    contexts = relabel_noisy(
        noisy,
        clean,
        predictor,
        max_new_tokens=settings.answer_max_new_tokens,
        batch_size=settings.batch_size,
        writer=ShardWriter(out_dir / "relabel", meta={"stage": "relabel"}),
    )
    by_idx = {r["idx"]: r for r in contexts}
    merged = Dataset.from_list([{**r, **by_idx[r["idx"]]} for r in noisy])
    return review_labels(
        merged,
        mode=settings.review,
        rel_tol=settings.number_rel_tol,
        predictor=predictor,
        max_new_tokens=settings.answer_max_new_tokens,
        batch_size=settings.batch_size,
        writer=(
            ShardWriter(out_dir / "review", meta={"stage": "review"})
            if settings.review == "model"
            else None
        ),
    )


def _with_neighbours(
    noisy: Dataset,
    clean: Dataset,
    settings: RobustFTConfig,
    encoder: Encoder | None,
    out_dir: Path,
) -> Dataset:
    """Retrieved clean examples per noisy row, cached in relabel/neighbours.json."""
    path = out_dir / "relabel" / NEIGHBOURS_FILE
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        nb = {int(k): v for k, v in saved["neighbours"].items()}
        if set(nb) == set(noisy["idx"]):
            return noisy.add_column(
                "neighbours", [nb[i]["idx"] for i in noisy["idx"]]
            ).add_column("neighbour_sims", [nb[i]["sims"] for i in noisy["idx"]])
        LOG.warning("robustft: %s does not match the noisy rows; recomputing", path)
    if len(clean) and encoder is None:
        encoder = load_encoder(settings.encoder)
    noisy = retrieve_examples(
        noisy, clean, encoder, k=settings.k, batch_size=settings.encoder_batch_size
    )
    atomic_write_json(
        path,
        {
            "neighbours": {
                str(r["idx"]): {"idx": r["neighbours"], "sims": r["neighbour_sims"]}
                for r in noisy
            }
        },
    )
    return noisy


# ------------------------------------------------------------------ outputs


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _write_outputs(
    ds: Rows,
    settings: RobustFTConfig,
    out_dir: Path,
    clean: Dataset,
    reviewed: Dataset,
    selected: Dataset,
    skipped: Mapping[int, str],
    experts: Sequence[tuple[str, str]],
    source: str,
    extra: Mapping[str, Any] | None = None,
) -> DenoiseResult:
    """Write denoised.jsonl, all.jsonl and report.json (last: marks completion)."""
    answer_field = settings.fields.answer
    with_probs = (
        settings.expert_scoring == "loglik" or settings.expert_training == "crossfit"
    )
    chosen = set(selected["idx"]) if len(selected) else set()
    cut = (
        "entropy above its label's quota (selection: quota)"
        if settings.selection == "quota"
        else "entropy above the select_ratio cut"
    )
    info: dict[int, dict[str, Any]] = {}
    for r in clean:
        info[r["idx"]] = {**r, "status": "clean", "new": r["label"], "why": None}
    for r in reviewed:
        if r["idx"] in chosen:
            status, why = "relabelled", None
        elif r["new_label"] is not None:
            status, why = "dropped", cut
        else:
            status, why = "dropped", r["drop_reason"]
        info[r["idx"]] = {**r, "status": status, "new": r["new_label"], "why": why}

    all_rows, train_rows = [], []
    for idx, original in enumerate(ds):
        row = dict(original)
        if idx in skipped:
            row.update(
                {
                    f"{PREFIX}index": idx,
                    f"{PREFIX}status": "skipped",
                    f"{PREFIX}drop_reason": skipped[idx],
                }
            )
            all_rows.append(row)
            continue
        r = info[idx]
        if r["status"] == "clean":
            # D_clean is kept as it is: its parsed label ('5' for '5 km') is only
            # for comparing votes, never written back over the original answer.
            new = original.get(answer_field)
        elif r["new"] is not None:
            new = write_label(r["new"], r["kind"], r["style"], r["options"])
        else:
            new = None
        row.update(
            {
                f"{PREFIX}index": idx,
                f"{PREFIX}status": r["status"],
                f"{PREFIX}original_answer": original.get(answer_field),
                f"{PREFIX}new_answer": new,
                f"{PREFIX}entropy": _finite(r.get("entropy")),
                f"{PREFIX}experts_agreed": r["experts_agreed"],
                f"{PREFIX}votes": r["votes"],
                f"{PREFIX}reasoning_answer": r["reasoning_answer"],
                f"{PREFIX}context_answer": r.get("context_answer"),
                f"{PREFIX}neighbours": r.get("neighbours"),
                f"{PREFIX}drop_reason": r["why"],
            }
        )
        if with_probs:
            row[f"{PREFIX}option_probs"] = r.get("option_probs")
        if r["status"] != "dropped":
            row[answer_field] = new
            train_rows.append(row)
        all_rows.append(row)

    report = build_report(
        ds_len=len(ds),
        skipped=len(skipped),
        info=info,
        experts=[name for name, _ in experts],
        settings=settings,
        source=source,
        rel_tol=settings.number_rel_tol,
    )
    report["output_dir"] = str(out_dir)
    report["one_answer_experts"] = one_answer_experts(info)
    for name, value in (extra or {}).items():
        if value is not None:
            report[name] = value
    _warn_if_experts_look_weak(report)
    premise = premise_warning(report)
    if premise:
        LOG.warning("robustft: %s", premise)
    _write_jsonl(out_dir / ALL_FILE, all_rows)
    _write_jsonl(out_dir / TRAIN_FILE, train_rows)
    atomic_write_json(out_dir / REPORT_FILE, report)
    return DenoiseResult(
        out_dir, _to_dataset(train_rows), _to_dataset(all_rows), report
    )


WEAK_EXPERT_CLEAN_FRACTION = 0.2


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


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list(rows) if rows else Dataset.from_dict({})


def load_result(out_dir: str | Path) -> DenoiseResult:
    """A finished run read back from its folder."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    return DenoiseResult(
        out_dir,
        _to_dataset(_read_jsonl(out_dir / TRAIN_FILE)),
        _to_dataset(_read_jsonl(out_dir / ALL_FILE)),
        report,
    )


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


def expert_accuracy(
    rows: Sequence[Mapping[str, Any]], rel_tol: float
) -> dict[str, float | None]:
    """Each expert/prompt's share of right answers against the gold (no answer
    counts as wrong), over the rows it voted on."""
    hits: dict[str, list[bool]] = {}
    for r in rows:
        for v in r.get("votes") or []:
            key = f"{v['expert']}/{v['prompt']}"
            ok = answers_match(v["answer"], r["gold"], r["kind"], rel_tol)
            hits.setdefault(key, []).append(ok)
    return {k: _rate(sum(v), len(v)) for k, v in sorted(hits.items())}


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
    return (
        f"no expert is right more often than the labels against {gold['field']!r}: "
        f"best {best} {100 * acc:.1f}% vs labels {100 * labels:.1f}%; detection "
        "and relabelling cannot beat the input here (use a stronger expert)"
    )


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
            f"selection {report['selection']}"
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


def find_report(
    cfg: Mapping[str, Any], ds_cfg: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The report.json of a finished run on this `datasets:` entry (the folder
    `denoise_entry` would use), or None when it has not run."""
    from ..core.config import prefalign_config

    pa = prefalign_config(cfg)
    try:
        ds = load_input(ds_cfg, pa.on_bad_row).rows
    except (RobustFTError, ValueError):  # unreadable input: no run to report
        return None
    key = cache_key(
        pa.robustft, ds, base_model=cfg.get("base_model"), on_bad_row=pa.on_bad_row
    )
    source = str(ds_cfg.get("path", "dataset"))
    path = output_folder(default_parent(cfg, pa.robustft), source, key) / REPORT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------ Axolotl entry


def robustft_entries(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The `datasets:` entries with `type: axolotl_prefalign.robustft`."""
    return [d for d in (cfg.get("datasets") or []) if d.get("type") == DATASET_TYPE]


def denoise_entry(
    cfg: Mapping[str, Any],
    ds_cfg: Mapping[str, Any],
    ds: Rows | None = None,
    *,
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
) -> DenoiseResult:
    """Denoise one `datasets:` entry into its keyed output folder (or reuse it)."""
    from ..core.config import prefalign_config

    pa = prefalign_config(cfg)
    settings = pa.robustft
    lines = None
    if ds is None:
        data = load_input(ds_cfg, pa.on_bad_row)
        ds, lines = data.rows, data.lines
    base_model = cfg.get("base_model")
    key = cache_key(settings, ds, base_model=base_model, on_bad_row=pa.on_bad_row)
    source = str(ds_cfg.get("path", "dataset"))
    out_dir = output_folder(default_parent(cfg, settings), source, key)
    return denoise_dataset(
        ds,
        settings,
        out_dir,
        base_model=base_model,
        source=source,
        on_bad_row=pa.on_bad_row,
        load_predictor=load_predictor,
        encoder=encoder,
        load_in_4bit=bool(cfg.get("load_in_4bit")),
        lines=lines,
    )


def denoise_from_config(
    cfg: Mapping[str, Any],
    *,
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
    echo: Callable[[str], Any] = print,
) -> list[DenoiseResult]:
    """`axolotl prefalign denoise CONFIG`: denoise every RobustFT dataset entry."""
    entries = robustft_entries(cfg)
    if not entries:
        raise RobustFTError(
            f"no `datasets:` entry has `type: {DATASET_TYPE}`; RobustFT denoises "
            "those entries only"
        )
    if not main_process_only("axolotl prefalign denoise"):
        return []
    results = []
    for ds_cfg in entries:
        result = denoise_entry(
            cfg, ds_cfg, load_predictor=load_predictor, encoder=encoder
        )
        echo(format_report(result.report))
        results.append(result)
    return results
