"""A self-trained expert, cross-fitted on the noisy set (`expert_training: crossfit`).

Beyond the paper. The rows are split into k folds (a seeded shuffle, then row j of
the shuffle goes to fold j mod k). For each fold a LoRA of the base model is trained
with plain SFT on the OTHER k−1 folds (the question with its lettered options as
the user turn → the labelled option's text, loss on the answer tokens only), and
then scores the held-out fold by option log-likelihood (`loglik`). Every row's
option probabilities thus come from a model that never saw its (possibly wrong)
label: out-of-fold probabilities, the input confident learning (cleanlab) expects.

Each fold is written atomically (`fold-N/`, one shard and a manifest whose meta
lists the rows it trained on), so a rerun skips finished folds. The folds live in
`<robustft output parent>/crossfit/<key>/`, the key a hash of everything they
depend on (`fold_cache_key`: base model, cross-fitting settings, seed, and each
row's question, options and label), so the premise check and every denoise run on
the same rows (agreement or cleanlab detection, any selection) share them. Training is a
small torch loop (AdamW, constant learning rate, the fused log-prob path of
core/logprobs.py for the loss), framework-neutral like the rest of the package.
Cost: k LoRA trainings of (k−1)/k · epochs passes over the set, plus one scoring
pass (one forward per option) over the set.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from ..core.shards import ShardWriter
from .answers import letters
from .folder import FOLD_SETTINGS
from .predict import option_logliks, scored_row

LOG = logging.getLogger("axolotl_prefalign")

# fit(fold, train rows, held-out rows) → one option log-likelihood list per
# held-out row, from a model trained on the train rows only.
FoldFit = Callable[[int, Sequence[dict[str, Any]], Sequence[dict[str, Any]]], list]
# Longer SFT examples are left out of a fold's training (counted in the log).
MAX_TRAIN_TOKENS = 4096


CACHE_DIR = "crossfit"  # under the RobustFT output parent: folds by fold_cache_key


def fold_cache_key(
    rows: Sequence[dict[str, Any]], settings: Any, base_path: str, load_in_4bit: bool
) -> str:
    """Hash of what the out-of-fold probabilities depend on (not detection,
    selection or relabelling settings)."""
    import hashlib
    import json

    meta = {
        "base": base_path,
        "4bit": load_in_4bit,
        **{k: getattr(settings, k) for k in FOLD_SETTINGS},
        "rows": [[r["idx"], r["question"], r["options"], r["label"]] for r in rows],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def fold_assignment(indices: Sequence[int], folds: int, seed: int) -> dict[int, int]:
    """Row idx → fold: a seeded shuffle dealt round-robin (sizes differ by ≤ 1)."""
    order = sorted(indices)
    random.Random(seed).shuffle(order)
    return {idx: j % folds for j, idx in enumerate(order)}


def crossfit_option_probs(
    rows: Dataset,
    fit: FoldFit,
    *,
    folds: int,
    seed: int,
    out_dir: str | Path,
) -> Dataset:
    """Out-of-fold option log-likelihoods and probabilities of every row (columns
    idx, fold, option_logliks, option_probs, loglik_answer); resumable per fold."""
    items = list(rows)
    if len(items) < folds:
        raise ValueError(
            f"expert_training: crossfit needs at least crossfit_folds = {folds} rows, "
            f"got {len(items)}"
        )
    fold_of = fold_assignment([r["idx"] for r in items], folds, seed)
    out: list[dict[str, Any]] = []
    bar = tqdm(total=folds, desc="crossfit folds", unit="fold")
    with bar:
        for k in range(folds):
            held = [r for r in items if fold_of[r["idx"]] == k]
            train = [r for r in items if fold_of[r["idx"]] != k]
            writer = ShardWriter(
                Path(out_dir) / f"fold-{k}",
                meta={
                    "stage": "crossfit",
                    "fold": k,
                    "folds": folds,
                    "seed": seed,
                    "train": sorted(r["idx"] for r in train),
                },
            )
            if not writer.done_indices():
                bar.set_postfix_str(f"training fold {k} on {len(train)} rows")
                logliks = fit(k, train, held)
                if len(logliks) != len(held):
                    raise RuntimeError(
                        f"crossfit fold {k}: {len(logliks)} scores for {len(held)} rows"
                    )
                scored = [
                    {**scored_row(r["idx"], ll), "fold": k}
                    for r, ll in zip(held, logliks, strict=True)
                ]
                writer.write(scored, [r["idx"] for r in held])
            if not writer.complete:  # also after a stop between write and finish
                writer.finish({"rows": len(held)})
            out.extend(writer.rows())
            bar.update(1)
    out.sort(key=lambda r: r["idx"])
    return Dataset.from_list(out)


def answer_text(row: dict[str, Any]) -> str:
    """The labelled option's text: the SFT target of a training row."""
    return row["options"][letters(len(row["options"])).index(row["label"])]


class LoraCrossfit:
    """The default `FoldFit`: a fresh LoRA of the base model per fold.

    The base model is loaded once; each fold wraps it in a new adapter, trains,
    scores the held-out rows, and unloads the adapter again (the base weights are
    never changed).
    """

    def __init__(
        self,
        path: str,
        *,
        epochs: float,
        learning_rate: float,
        lora_r: int,
        batch_size: int,
        seed: int,
        score_batch_size: int = 8,
        load_in_4bit: bool = False,
    ):
        self.path, self.load_in_4bit = path, load_in_4bit
        self.epochs, self.learning_rate = epochs, learning_rate
        self.lora_r, self.batch_size, self.seed = lora_r, batch_size, seed
        self.score_batch_size = score_batch_size
        self.model: Any = None
        self.tokenizer: Any = None

    def _load(self) -> None:
        if self.model is None:
            from .predict import load_model

            LOG.info("robustft: loading %s for cross-fitting", self.path)
            self.model, self.tokenizer = load_model(
                self.path, load_in_4bit=self.load_in_4bit
            )

    def __call__(
        self,
        fold: int,
        train: Sequence[dict[str, Any]],
        held: Sequence[dict[str, Any]],
    ) -> list[list[float]]:
        import torch
        from peft import LoraConfig, get_peft_model

        from .loglik import reply_logliks

        self._load()
        torch.manual_seed(self.seed + fold)  # the adapter's initial weights
        peft_model = get_peft_model(
            self.model,
            LoraConfig(
                r=self.lora_r,
                lora_alpha=2 * self.lora_r,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
        try:
            train_lora(
                peft_model,
                self.tokenizer,
                [(r["question"], r["options"], answer_text(r)) for r in train],
                epochs=self.epochs,
                learning_rate=self.learning_rate,
                batch_size=self.batch_size,
                seed=self.seed + fold,
                desc=f"crossfit fold {fold} (train)",
            )

            def scorer(prompts, replies):
                return reply_logliks(
                    peft_model,
                    self.tokenizer,
                    prompts,
                    replies,
                    batch_size=self.score_batch_size,
                )

            return option_logliks(held, scorer)
        finally:
            # Back to the untouched base model for the next fold.
            self.model = peft_model.unload()

    def release(self) -> None:
        self.model = self.tokenizer = None


def train_lora(
    model: Any,
    tokenizer: Any,
    examples: Sequence[tuple[str, Sequence[str] | None, str]],
    *,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    desc: str = "crossfit (train)",
) -> list[float]:
    """Plain SFT of the trainable parameters on (question, options, answer) rows,
    loss on the answer tokens only; returns the loss of each step.

    loss = −(1/N) Σ_t log p(answer_t | prompt, answer_<t) over the N answer tokens
    of the batch. Steps = ceil(epochs · ceil(n / batch_size)); each epoch visits
    the rows in a fresh seeded order.
    """
    import torch

    from .loglik import answer_token_logprobs, encode_reply, padded_batch
    from .sft import user_turn

    encoded = []
    for question, options, answer in examples:
        ids, n_prompt = encode_reply(tokenizer, user_turn(question, options), answer)
        if len(ids) <= MAX_TRAIN_TOKENS:
            encoded.append((ids, n_prompt))
    if len(encoded) < len(examples):
        LOG.warning(
            "robustft: crossfit leaves out %d training row(s) over %d tokens",
            len(examples) - len(encoded),
            MAX_TRAIN_TOKENS,
        )
    if not encoded:
        raise ValueError("crossfit: no training rows for this fold")
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    per_epoch = math.ceil(len(encoded) / batch_size)
    steps = math.ceil(epochs * per_epoch)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc=desc, unit="step", leave=False):
        if step % per_epoch == 0:
            order = torch.randperm(len(encoded), generator=gen).tolist()
        pos = (step % per_epoch) * batch_size
        batch = padded_batch([encoded[i] for i in order[pos : pos + batch_size]], pad)
        lp = answer_token_logprobs(model, batch)
        n_tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
        loss = -lp.sum() / n_tokens.to(lp.device)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
