"""Held-out preference accuracy: `prefalign eval-pairs CONFIG --split SPLIT`.

For each held-out pair (x, y_w, y_l) the margin is

    m = logp(y_w | x) − logp(y_l | x)      (summed response log-probs)

and the accuracy is the fraction of pairs with m > 0, for the base model (the
adapter disabled) and for the trained adapter (or full model). The pairs come from
a `datasets:` entry of the YAML read with another `split` (Axolotl's slice syntax,
e.g. `train[60:]` for rows the run did not train on), rendered by that entry's own
DPO `type:` and tokenised as TRL's DPO trainer tokenises them, so they are scored
exactly as training sees its pairs. A log-prob margin rather than DPO's implicit
reward: the base model's implicit reward against itself is zero for every pair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...spa.judge import encode_like_trl, sequence_logprobs


@dataclass(frozen=True)
class PairAccuracy:
    """Preference accuracy of one model on the held-out pairs."""

    pairs: int
    accuracy: float
    mean_margin: float


@dataclass(frozen=True)
class HeldOutResult:
    """Base model vs trained model on the same held-out pairs."""

    source: str
    split: str
    base: PairAccuracy
    trained: PairAccuracy | None
    trained_path: str | None

    def line(self) -> str:
        """The one-line before/after summary the quickstart prints."""
        where = f"{self.source} [{self.split}]"
        if self.trained is None:
            return (
                f"held-out preference accuracy on {self.base.pairs} pairs of {where}: "
                f"base {self.base.accuracy:.3f}"
            )
        return (
            f"held-out preference accuracy on {self.base.pairs} pairs of {where}: "
            f"base {self.base.accuracy:.3f} -> trained {self.trained.accuracy:.3f} "
            f"(mean log-prob margin {self.base.mean_margin:+.2f} -> "
            f"{self.trained.mean_margin:+.2f}); trained model: {self.trained_path}"
        )


def load_pairs(
    cfg: Any, split: str, dataset_index: int = 0
) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of one `datasets:` entry read with `split`,
    rendered by its DPO `type:` and the tokenizer's chat template as TRL does."""
    from axolotl.loaders import load_tokenizer
    from axolotl.prompt_strategies.dpo import load as load_dpo
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault
    from trl.data_utils import maybe_apply_chat_template

    entries = cfg.get("datasets") or []
    if not 0 <= dataset_index < len(entries):
        raise ValueError(
            f"--dataset {dataset_index}: the YAML has {len(entries)} datasets: entries"
        )
    entry = DictDefault(copy.deepcopy(dict(entries[dataset_index])))
    entry["split"] = split
    dataset = load_dataset_with_config(entry, cfg.get("hf_use_auth_token"))
    transform = None
    if entry.get("type"):
        transform = load_dpo(entry["type"], cfg, dataset_idx=dataset_index)
        if isinstance(transform, tuple):
            transform = transform[0]
    tokenizer = load_tokenizer(cfg)
    eos = tokenizer.eos_token or ""
    out = []
    for row in dataset:
        row = transform(dict(row)) if transform else dict(row)
        row = maybe_apply_chat_template(
            {k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer
        )
        # TRL's DPO trainer ends plain-text completions with EOS.
        chosen, rejected = (
            t if not eos or t.endswith(eos) else t + eos
            for t in (row["chosen"], row["rejected"])
        )
        out.append((row["prompt"], chosen, rejected))
    return out


def pair_margins(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str, str]],
    *,
    batch_size: int = 8,
    chunk_size: int | None = None,
) -> list[float]:
    """logp(chosen | prompt) − logp(rejected | prompt) for each pair."""
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        encoded = [encode_like_trl(tokenizer, p, c) for p, c, _ in batch]
        encoded += [encode_like_trl(tokenizer, p, r) for p, _, r in batch]
        logps, _ = sequence_logprobs(model, encoded, pad, chunk_size=chunk_size)
        n = len(batch)
        margins += (logps[:n] - logps[n:]).tolist()
    return margins


def accuracy(margins: list[float]) -> PairAccuracy:
    """Fraction of pairs with a positive margin, and the mean margin."""
    n = len(margins)
    if not n:
        raise ValueError("no held-out pairs to evaluate (check --split)")
    return PairAccuracy(n, sum(m > 0 for m in margins) / n, sum(margins) / n)


def _load_model(path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def evaluate_heldout(
    cfg: Any,
    split: str,
    trained: str | Path | None = None,
    *,
    dataset_index: int = 0,
    batch_size: int = 8,
) -> HeldOutResult:
    """Preference accuracy of the base model and of `trained` (a LoRA adapter or a
    full model folder; default: the YAML's output_dir) on the held-out pairs."""
    from axolotl.loaders import load_tokenizer

    pairs = load_pairs(cfg, split, dataset_index)
    tokenizer = load_tokenizer(cfg)
    chunk = (cfg.get("prefalign") or {}).get("chunk_size")
    score = {"batch_size": batch_size, "chunk_size": chunk}
    if trained is None and cfg.get("output_dir"):
        out = Path(cfg["output_dir"])
        if (out / "adapter_config.json").exists() or (out / "config.json").exists():
            trained = out
    base_model = _load_model(str(cfg["base_model"]))
    result_trained, trained_path = None, None
    if trained is not None and (Path(trained) / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, str(trained)).eval()
        with model.disable_adapter():
            base = accuracy(pair_margins(model, tokenizer, pairs, **score))
        result_trained = accuracy(pair_margins(model, tokenizer, pairs, **score))
        trained_path = str(Path(trained).resolve())
    else:
        base = accuracy(pair_margins(base_model, tokenizer, pairs, **score))
        if trained is not None:
            del base_model
            model = _load_model(str(trained))
            result_trained = accuracy(pair_margins(model, tokenizer, pairs, **score))
            trained_path = str(Path(trained).resolve())
    source = str(cfg["datasets"][dataset_index].get("path"))
    return HeldOutResult(source, split, base, result_trained, trained_path)
