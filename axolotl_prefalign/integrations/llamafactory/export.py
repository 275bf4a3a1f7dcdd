"""Export the plugin's prepared data for LLaMA-Factory (`axolotl prefalign export`).

`export_from_config(cfg, out_dir, target="llamafactory")` writes, from one Axolotl
YAML, every data set the YAML's workflow has prepared, as LLaMA-Factory reads it
(its data/README.md: alpaca format, `dataset_info.json` entries):

- `prefalign_contrast`  contrast pairs as alpaca SFT rows: `instruction` = the
  rendered contrast text up to and including the positive-answer marker (question,
  negative answer, ...), `output` = the positive answer. LLaMA-Factory masks the
  prompt, which is our negative-answer masking. The text comes from
  `ContrastFormat.render`, so it is what `type: axolotl_prefalign.contrast` trains
  on (raw mode: with `template: empty`, byte for byte, EOS included).
- `prefalign_spa_seed`, `prefalign_spa_iter<i>`  labelled seed pairs and each
  finished SPA expansion as `ranking: true` pairwise sets (`instruction`, `input`,
  `chosen`, `rejected`; `judge_prob`, `margin`, `iteration` ride along unused).
- `prefalign_robustft`  the RobustFT-denoised training rows (D_clean ∪ D_select)
  as alpaca SFT rows: the question with its lettered options → the (new) answer.

Bad rows follow `prefalign.on_bad_row` (a clear error, or a counted skip).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...contrast.format import (
    _SENTINELS,
    ContrastFormat,
    ContrastPair,
    RowProblem,
    is_positive_only,
    parse_row,
)
from ...contrast.format import TYPE_NAME as CONTRAST_TYPE
from ...core.config import ContrastConfig, PrefAlignConfig
from ...core.local_data import DataFileError, LocalRows, entry_get, read_entry
from ...core.rows import RowChecker, check_text_fields
from ...core.shards import atomic_write_json, atomic_write_text, main_process_only

LOG = logging.getLogger("axolotl_prefalign")

TARGETS = ("llamafactory",)
DATASET_INFO = "dataset_info.json"
SPA_TYPE = "axolotl_prefalign.spa_pairs"
ROBUSTFT_TYPE = "axolotl_prefalign.robustft"
CONTRAST_NAME = "prefalign_contrast"
SPA_SEED_NAME = "prefalign_spa_seed"
ROBUSTFT_NAME = "prefalign_robustft"
# LLaMA-Factory's column roles (keys) → our column names (values).
SFT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
PAIR_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "chosen": "chosen",
    "rejected": "rejected",
}


class ExportError(ValueError):
    """The export cannot be done as asked (unsupported setting, missing output)."""


def spa_iter_name(iteration: int) -> str:
    """The LLaMA-Factory dataset name of SPA iteration `iteration`'s pairs."""
    return f"prefalign_spa_iter{iteration}"


@dataclass
class ExportedSet:
    """One data set written for LLaMA-Factory and its `dataset_info.json` entry."""

    name: str
    file: str
    rows: list[dict[str, Any]]
    ranking: bool
    columns: dict[str, str]
    source: str
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """The entry LLaMA-Factory's `dataset_info.json` needs for this file."""
        entry: dict[str, Any] = {"file_name": self.file}
        if self.ranking:
            entry["ranking"] = True
        entry["columns"] = dict(self.columns)
        return entry


# ---------------------------------------------------------------------------
# Contrast pairs → alpaca SFT rows


class _ChatCapture:
    """Stands in for the tokenizer in chat mode: records the messages that
    `ContrastFormat.render` hands to the chat template, so the export keeps the
    message structure and LLaMA-Factory's own template renders it."""

    chat_template = "captured by axolotl_prefalign.export"
    eos_token_id = None
    bos_token_id = None

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []

    def apply_chat_template(self, messages, tokenize: bool = False, **_: Any) -> str:
        self.messages = [dict(m) for m in messages]
        return "\n".join(m["content"] for m in messages)


def _fill(text: str, pair: ContrastPair, positive_only: bool) -> str:
    values = {
        "question": pair.question,
        "negative": "" if positive_only else pair.negative,
        "positive": pair.positive,
    }
    for kind, sentinel in _SENTINELS.items():
        text = text.replace(sentinel, values[kind])
    return text


def _raw_row(fmt: ContrastFormat, pair: ContrastPair, positive_only: bool) -> dict:
    pieces = fmt.render(pair, positive_only)
    at = next(j for j, p in enumerate(pieces) if p.kind == "positive")
    tail = pieces[at + 1 :]
    # negative_first: the positive answer ends the row; the `end` piece without
    # text is the EOS token, written as text so that LLaMA-Factory's `empty`
    # template (which adds none) tokenizes it to the same id.
    if [p.kind for p in tail if p.text or p.kind == "end"] != ["end"] or tail[0].text:
        raise ExportError("the rendered contrast row does not end on the answer")
    eos = fmt.tokenizer.eos_token
    return {
        "instruction": "".join(p.text for p in pieces[:at]),
        "input": "",
        "output": pieces[at].text + eos,
    }


def _chat_row(
    fmt: ContrastFormat, capture: _ChatCapture, pair: ContrastPair, pos_only: bool
) -> dict:
    fmt.render(pair, pos_only)  # fills capture.messages (with the sentinels)
    msgs = [
        {"role": m["role"], "content": _fill(m["content"], pair, pos_only)}
        for m in capture.messages
    ]
    system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else None
    *turns, user, answer = msgs
    if user["role"] != "user" or answer["role"] != "assistant":
        raise ExportError("the contrast row does not end on user → assistant")
    history = []
    for j in range(0, len(turns), 2):
        roles = [t["role"] for t in turns[j : j + 2]]
        if roles != ["user", "assistant"]:
            raise RowProblem(
                None,
                "earlier chat turns must alternate user → assistant to become "
                f"LLaMA-Factory history; got {[t['role'] for t in turns]}",
            )
        history.append([turns[j]["content"], turns[j + 1]["content"]])
    row: dict[str, Any] = {
        "instruction": user["content"],
        "input": "",
        "output": answer["content"],
    }
    if system is not None:
        row["system"] = system
    if history:
        row["history"] = history
    return row


def contrast_rows(
    rows: Iterable[Mapping[str, Any]],
    config: ContrastConfig,
    tokenizer: Any,
    checker: RowChecker,
) -> list[dict[str, Any]]:
    """Preference rows as alpaca SFT rows, rendered exactly as the contrast format
    renders them (same positive-only choice per row index)."""
    if config.order != "negative_first":
        raise ExportError(
            "prefalign.contrast.order: positive_first puts the negative answer after "
            "the trained answer; an alpaca row (prompt → output) cannot hold that. "
            "Export with order: negative_first"
        )
    capture = _ChatCapture() if config.mode == "chat" else None
    fmt = ContrastFormat(
        capture or tokenizer,
        config,
        sequence_len=sys.maxsize,
        source=checker.source,
        on_bad_row=checker.policy,
    )
    out = []
    for index, row in enumerate(rows):
        try:
            pair = parse_row(row, config.fields)
            pos_only = is_positive_only(index, config.positive_only_ratio, config.seed)
            if capture is not None:
                out.append(_chat_row(fmt, capture, pair, pos_only))
            else:
                out.append(_raw_row(fmt, pair, pos_only))
        except RowProblem as err:
            checker.bad(index, err.field, err.problem)
    return out


# ---------------------------------------------------------------------------
# SPA pairs and RobustFT rows


def _finite_or_none(value: float) -> float | None:
    # NaN (a seed pair's margin) is not JSON; null says "not judged".
    return None if value is None or math.isnan(value) else value


def spa_rows(
    rows: Iterable[Mapping[str, Any]], checker: RowChecker
) -> list[dict[str, Any]]:
    """SPA / labelled pairs as LLaMA-Factory pairwise rows (same validation as
    `type: axolotl_prefalign.spa_pairs`)."""
    from ...spa.pairs import normalize_pair

    out = []
    for index, row in enumerate(rows):
        pair = normalize_pair(row, index, checker)
        if pair is None:
            continue
        out.append(
            {
                "instruction": pair["prompt"],
                "input": "",
                "chosen": pair["chosen"],
                "rejected": pair["rejected"],
                "judge_prob": pair["judge_prob"],
                "margin": _finite_or_none(pair["margin"]),
                "iteration": pair["iteration"],
            }
        )
    return out


def robustft_rows(
    rows: Iterable[Mapping[str, Any]],
    question: str,
    answer: str,
    options: str | None,
    checker: RowChecker,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Denoised RobustFT rows as alpaca SFT rows: the user turn RobustFT's dataset
    type trains on (question + lettered options) → the answer; a row's text in
    column `system` is kept as its `system`."""
    from ...robustft.sft import user_turn

    out = []
    for index, row in enumerate(rows):
        if not check_text_fields(checker, index, row, [question]):
            continue
        label = row.get(answer)
        label = None if label is None else str(label).strip()
        if not label:
            checker.bad(index, answer, "missing" if label is None else "empty")
            continue
        opts = row.get(options) if options else None
        if opts is not None and not (
            isinstance(opts, list) and all(isinstance(o, str) for o in opts)
        ):
            checker.bad(index, options, "options must be a list of texts")
            continue
        sft = {
            "instruction": user_turn(row[question], opts),
            "input": "",
            "output": label,
        }
        if system and isinstance(row.get(system), str) and row[system].strip():
            sft["system"] = row[system]
        out.append(sft)
    return out


# ---------------------------------------------------------------------------
# Reading the YAML's data


def load_local_rows(ds_cfg: Any, on_bad_row: str = "error") -> LocalRows:
    """The rows of a `datasets:` entry that names local data, with their lines
    (the export never reaches a hub)."""
    try:
        return read_entry(ds_cfg, on_bad_row)
    except DataFileError as err:
        raise ExportError(f"the export reads local data only: {err}") from None


def _entries(cfg: Any, type_name: str) -> list[Any]:
    return [d for d in (cfg.get("datasets") or []) if entry_get(d, "type") == type_name]


def export_contrast(cfg: Any, pa: PrefAlignConfig, tokenizer: Any) -> ExportedSet:
    """The YAML's contrast data sets as one LLaMA-Factory SFT set."""
    rows, skipped = [], 0
    sources = []
    for ds_cfg in _entries(cfg, CONTRAST_TYPE):
        data = load_local_rows(ds_cfg, pa.on_bad_row)
        checker = data.checker(pa.on_bad_row)
        rows += contrast_rows(data.rows, pa.contrast, tokenizer, checker)
        checker.report()
        skipped += data.n_skipped + checker.n_skipped
        sources.append(checker.source)
    columns = dict(SFT_COLUMNS)
    if any("system" in r for r in rows):
        columns["system"] = "system"
    if any("history" in r for r in rows):
        columns["history"] = "history"
    c = pa.contrast
    notes = [
        "LLaMA-Factory template: empty (raw mode: the text is ours, BOS/EOS included)"
        if c.mode == "raw"
        else "LLaMA-Factory template: the one matching the model's chat template"
    ]
    if c.unlikelihood_weight > 0:
        notes.append(
            "unlikelihood_weight > 0 is not exported: LLaMA-Factory trains the "
            "positive answer only"
        )
    return ExportedSet(
        CONTRAST_NAME,
        "contrast_sft.jsonl",
        rows,
        False,
        columns,
        ", ".join(sources),
        skipped,
        notes,
    )


def _pair_set(name: str, file: str, rows, source: str, policy: str) -> ExportedSet:
    checker = RowChecker(source, policy)
    out = spa_rows(rows, checker)
    checker.report()
    return ExportedSet(
        name, file, out, True, dict(PAIR_COLUMNS), source, checker.n_skipped
    )


def export_spa(cfg: Any, pa: PrefAlignConfig) -> list[ExportedSet]:
    """Labelled seed pairs (`type: axolotl_prefalign.spa_pairs` entries) and every
    finished SPA expansion under `output_dir/iter_<i>/pairs`."""
    from ...core.shards import read_shards
    from ...spa.loop import expansion_done, iter_dir

    sets = []
    seeds = _entries(cfg, SPA_TYPE)
    if seeds:
        rows, sources, skipped = [], [], 0
        for ds_cfg in seeds:
            data = load_local_rows(ds_cfg, pa.on_bad_row)
            checker = data.checker(pa.on_bad_row)
            rows += spa_rows(data.rows, checker)
            checker.report()
            skipped += data.n_skipped + checker.n_skipped
            sources.append(data.source)
        sets.append(
            ExportedSet(
                SPA_SEED_NAME,
                "spa_seed.jsonl",
                rows,
                True,
                dict(PAIR_COLUMNS),
                ", ".join(sources),
                skipped,
            )
        )
    out_dir = cfg.get("output_dir")
    if out_dir and pa.spa.prompts:
        for i in range(1, pa.spa.iterations + 1):
            d = iter_dir(out_dir, i)
            if not expansion_done(d):
                LOG.info("export: no finished SPA expansion in %s", d)
                continue
            sets.append(
                _pair_set(
                    spa_iter_name(i),
                    f"spa_iter{i}.jsonl",
                    list(read_shards(d / "pairs")),
                    str(d / "pairs"),
                    pa.on_bad_row,
                )
            )
    return sets


def robustft_output_dir(cfg: Any, ds_cfg: Any) -> Path:
    """The keyed folder where `axolotl prefalign denoise` puts this entry's output
    (the same key `denoise_entry` computes; nothing is run here)."""
    from ...core.config import prefalign_config
    from ...robustft.pipeline import (
        cache_key,
        default_parent,
        load_input,
        output_folder,
    )

    pa = prefalign_config(cfg)
    ds = load_input(ds_cfg, pa.on_bad_row).rows
    key = cache_key(
        pa.robustft, ds, base_model=cfg.get("base_model"), on_bad_row=pa.on_bad_row
    )
    source = str(entry_get(ds_cfg, "path") or "dataset")
    return output_folder(default_parent(cfg, pa.robustft), source, key)


def export_robustft(cfg: Any, pa: PrefAlignConfig) -> ExportedSet:
    """The denoised training rows of every RobustFT entry as one SFT set."""
    from ...robustft.pipeline import REPORT_FILE, TRAIN_FILE, load_result

    rows, skipped, sources = [], 0, []
    f = pa.robustft.fields
    for ds_cfg in _entries(cfg, ROBUSTFT_TYPE):
        folder = robustft_output_dir(cfg, ds_cfg)
        if not (folder / REPORT_FILE).exists():
            raise ExportError(
                f"{entry_get(ds_cfg, 'path')}: no finished RobustFT output in "
                f"{folder}; run `axolotl prefalign denoise CONFIG` first"
            )
        source = str(folder / TRAIN_FILE)
        checker = RowChecker(source, pa.on_bad_row)
        train = load_result(folder).train
        rows += robustft_rows(train.to_list(), f.question, f.answer, f.options, checker)
        checker.report()
        skipped += checker.n_skipped
        sources.append(source)
    return ExportedSet(
        ROBUSTFT_NAME,
        "robustft_sft.jsonl",
        rows,
        False,
        dict(SFT_COLUMNS),
        ", ".join(sources),
        skipped,
    )


# ---------------------------------------------------------------------------
# Writing


def write_llamafactory(out_dir: str | Path, sets: list[ExportedSet]) -> Path:
    """Write each set as JSON lines and merge its entry into `dataset_info.json`
    (entries of other data sets in that file are kept)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / DATASET_INFO
    info = {}
    if info_path.exists():
        from ...core.dataset_info import read_info

        try:
            info = read_info(info_path)
        except DataFileError as err:
            raise ExportError(str(err)) from None
    for s in sets:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in s.rows)
        atomic_write_text(out / s.file, text)
        info[s.name] = s.info()
    atomic_write_json(info_path, info)
    return info_path


def format_summary(out_dir: str | Path, sets: list[ExportedSet]) -> str:
    """A small table of what was written."""
    lines = [
        f"LLaMA-Factory data in {out_dir} (dataset_dir; entries in {DATASET_INFO}):",
        f"  {'dataset':<22} {'kind':<9} {'rows':>6} {'skipped':>7}  file",
    ]
    for s in sets:
        kind = "pairwise" if s.ranking else "sft"
        lines.append(
            f"  {s.name:<22} {kind:<9} {len(s.rows):>6} {s.skipped:>7}  {s.file}"
        )
        lines += [f"      {note}" for note in s.notes]
    return "\n".join(lines)


def export_from_config(
    cfg: Any,
    out_dir: str | Path,
    *,
    target: str = "llamafactory",
    tokenizer: Any = None,
    echo: Callable[[str], Any] = print,
) -> list[ExportedSet]:
    """`axolotl prefalign export --to llamafactory CONFIG OUT_DIR`."""
    from ...core.config import prefalign_config

    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; valid: {TARGETS}")
    pa = prefalign_config(cfg)
    if not main_process_only("axolotl prefalign export"):
        return []
    sets: list[ExportedSet] = []
    if _entries(cfg, CONTRAST_TYPE):
        if tokenizer is None and pa.contrast.mode == "raw":
            # Raw mode writes the tokenizer's BOS (if it adds one) and EOS as text.
            from axolotl.loaders import load_tokenizer

            tokenizer = load_tokenizer(cfg)
        sets.append(export_contrast(cfg, pa, tokenizer))
    sets += export_spa(cfg, pa)
    if _entries(cfg, ROBUSTFT_TYPE):
        sets.append(export_robustft(cfg, pa))
    if not sets:
        raise ExportError(
            "nothing to export: the YAML has no dataset of type "
            f"{CONTRAST_TYPE}, {SPA_TYPE} or {ROBUSTFT_TYPE}"
        )
    for s in sets:
        if not s.rows:
            raise ExportError(f"{s.source}: no usable rows to export for {s.name}")
    write_llamafactory(out_dir, sets)
    echo(format_summary(out_dir, sets))
    return sets


__all__ = [
    "ExportError",
    "ExportedSet",
    "contrast_rows",
    "export_from_config",
    "robustft_rows",
    "spa_rows",
    "write_llamafactory",
]
