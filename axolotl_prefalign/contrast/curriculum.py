"""Curriculum order for contrast SFT: the rows from easy to hard by a stated measure.

Each answer is scored as the positive answer of a positive-only row, so its prompt is
exactly the inference prompt (`build_inference_prompt`) and the end token counts:

    margin_i = Σ_t log p(y_w,t | x_i, y_w,<t) − Σ_t log p(y_l,t | x_i, y_l,<t)

under the base model (large = the model already prefers the chosen answer = easy);
`length_i` = tokens of y_w + tokens of y_l (short = easy). Margins cost one forward
pass per answer through the fused log-prob path (core/logprobs.py), so they are
computed once and kept in a cache folder keyed by the model files, the token ids
scored and the settings; the folder is written as atomic shards (core/shards.py), so
an interrupted scoring resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.shards import ShardWriter
from .format import IGNORE_INDEX, ContrastFormat, EncodedRow, RowProblem, parse_row

LOG = logging.getLogger("axolotl_prefalign")

# Bumped when the scoring itself changes, so older caches are not reused.
MARGIN_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def answer_rows(fmt: ContrastFormat, pair: Any, index: int) -> tuple[EncodedRow, ...]:
    """(chosen, rejected), each encoded as the answer of a positive-only row."""
    scorer = _positive_only(fmt)
    return tuple(
        _encode_answer(scorer, replace(pair, positive=answer, negative=""), index)
        for answer in (pair.positive, pair.negative)
    )


def _positive_only(fmt: ContrastFormat) -> ContrastFormat:
    config = fmt.config.model_copy(
        update={"positive_only_ratio": 1.0, "unlikelihood_weight": 0.0}
    )
    return ContrastFormat(fmt.tokenizer, config, sequence_len=fmt.sequence_len)


def _encode_answer(scorer: ContrastFormat, pair: Any, index: int) -> EncodedRow:
    try:
        return scorer.encode_pair(pair, index)
    except RowProblem:
        # A rejected answer longer than the row: scored on its first tokens.
        limit = scorer.sequence_len
        scorer.sequence_len = sys.maxsize
        try:
            row = scorer.encode_pair(pair, index)
        finally:
            scorer.sequence_len = limit
        return EncodedRow(row.ids[:limit], row.kinds[:limit], True, ("answer_cut",))


def encode_pairs(
    fmt: ContrastFormat, rows: Sequence[Mapping[str, Any]], indices: Sequence[int]
) -> list[tuple[EncodedRow, ...]]:
    """The scored (chosen, rejected) encodings of the raw rows at `indices`."""
    return [answer_rows(fmt, parse_row(rows[i], fmt.config.fields), i) for i in indices]


def answer_lengths(encoded: Sequence[tuple[EncodedRow, ...]]) -> list[int]:
    """Tokens of the chosen plus the rejected answer of each pair (end tokens not)."""
    return [sum(row.kinds.count("positive") for row in pair) for pair in encoded]


def data_fingerprint(encoded: Sequence[tuple[EncodedRow, ...]]) -> str:
    """sha256 of every scored token id and label: data, format and tokenizer."""
    digest = hashlib.sha256()
    for pair in encoded:
        for row in pair:
            digest.update(json.dumps([row.ids, row.labels]).encode())
    return digest.hexdigest()


def model_files_key(path: str | os.PathLike, revision: str | None = None) -> str:
    """What identifies a model's weights without loading them: the name, size and
    modification time of each weight and config file of a local folder, else the
    hub id and revision."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"{path}@{revision or 'main'}"
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    stats = [(p.relative_to(folder).as_posix(), *_size_mtime(p)) for p in files]
    return hashlib.sha256(
        json.dumps([str(folder.resolve()), stats]).encode()
    ).hexdigest()


def _size_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def cache_key(model_key: str, data_key: str, settings: Mapping[str, Any]) -> str:
    """The cache folder's name: a hash of model, data and scoring settings."""
    blob = json.dumps(
        {"version": MARGIN_VERSION, "model": model_key, "data": data_key, **settings},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def answer_logprobs(model: Any, rows: Sequence[EncodedRow], pad_id: int) -> list[float]:
    """Σ log p of the loss-carrying tokens (answer + end token) of each row, in one
    right-padded forward pass through the fused log-prob path."""
    import torch

    from ..core.heads import causal_lm, lm_head_weights
    from ..core.logprobs import token_logprobs
    from ..core.preference import HiddenCapture

    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, row in enumerate(rows):
        n = len(row.ids)
        ids[i, :n], mask[i, :n] = torch.tensor(row.ids), 1
        labels[i, :n] = torch.tensor(row.labels)
    device = next(model.parameters()).device
    with torch.no_grad(), HiddenCapture(causal_lm(model).get_decoder()) as cap:
        # One position reaches the model's own head; the fused path does the rest.
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            use_cache=False,
            logits_to_keep=1,
        )
        with lm_head_weights(model) as (weight, bias):
            lp = token_logprobs(
                cap.hidden[:, :-1], weight, labels[:, 1:].to(device), bias=bias
            )
    return [float(x) for x in lp.sum(-1).cpu()]


def margins(
    encoded: Sequence[tuple[EncodedRow, ...]],
    *,
    load_model: Callable[[], Any],
    pad_id: int,
    cache_dir: str | os.PathLike,
    model_key: str,
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 8,
) -> list[float]:
    """log p(chosen) − log p(rejected) per pair, from the cache when it holds them;
    the model is loaded (`load_model()`) only when some pair is still unscored."""
    settings = dict(settings or {})
    data_key = data_fingerprint(encoded)
    folder = Path(cache_dir) / cache_key(model_key, data_key, settings)
    meta = {"model": model_key, "data": data_key, "pairs": len(encoded), **settings}
    writer = ShardWriter(folder, meta={"version": MARGIN_VERSION, **meta})
    todo = [i for i in range(len(encoded)) if i not in writer.done_indices()]
    if todo:
        _score(writer, encoded, todo, load_model(), pad_id, batch_size)
        writer.finish()
    else:
        LOG.info(
            "prefalign: curriculum margins of %d pairs from %s", len(encoded), folder
        )
    by_index = {r["index"]: r["chosen"] - r["rejected"] for r in writer.rows()}
    return [by_index[i] for i in range(len(encoded))]


def _score(writer, encoded, todo, model, pad_id: int, batch_size: int) -> None:
    """Score the pairs `todo`, one shard per batch (the unit of resuming)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(todo), batch_size), desc="Curriculum margins", unit="batch"
        ):
            batch = todo[start : start + batch_size]
            rows = [row for i in batch for row in encoded[i]]
            lp = answer_logprobs(model, rows, pad_id)
            out = [
                {"index": i, "chosen": lp[2 * j], "rejected": lp[2 * j + 1]}
                for j, i in enumerate(batch)
            ]
            writer.write(out, batch)
    finally:
        model.train(was_training)


def curriculum_positions(
    scores: Sequence[float], *, measure: str, order: str = "easy_first"
) -> list[int]:
    """Positions of `scores` from easy to hard (or hard to easy); ties keep the
    file order. Easy: a large margin, a short length."""
    sign = -1 if measure == "margin" else 1  # sort key: small = easy
    if order == "hard_first":
        sign = -sign
    return sorted(range(len(scores)), key=lambda i: sign * scores[i])


def order_rows(
    fmt: ContrastFormat,
    rows: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    *,
    load_model: Callable[[], Any] | None = None,
    model_key: str = "",
    cache_dir: str | os.PathLike | None = None,
) -> list[int]:
    """Training order (positions in `indices`) of the raw rows at `indices` by the
    format's `curriculum` setting."""
    config = fmt.config
    encoded = encode_pairs(fmt, rows, indices)
    if config.curriculum == "length":
        scores: list[float] = list(answer_lengths(encoded))
    else:
        if load_model is None or cache_dir is None:
            raise ValueError("curriculum: margin needs the base model and a cache dir")
        scores = margins(
            encoded,
            load_model=load_model,
            pad_id=_pad_id(fmt.tokenizer),
            cache_dir=cache_dir,
            model_key=model_key,
            batch_size=config.curriculum_batch_size,
        )
    LOG.info(
        "prefalign: %d contrast rows in curriculum order (%s, %s)",
        len(scores),
        config.curriculum,
        config.curriculum_order,
    )
    return curriculum_positions(
        scores, measure=config.curriculum, order=config.curriculum_order
    )


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
