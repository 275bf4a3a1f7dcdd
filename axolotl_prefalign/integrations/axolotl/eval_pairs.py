"""Held-out preference accuracy: `prefalign eval-pairs CONFIG --split SPLIT`.

For each held-out pair (x, y_w, y_l) the margin is

    m = logp(y_w | x) − logp(y_l | x)      (summed response log-probs)

and the accuracy is the fraction of pairs with m > 0, for the base model (the
adapter disabled) and for the trained adapter (or full model). The pairs come from
a `datasets:` entry of the YAML read with another `split` (Axolotl's slice syntax,
e.g. `train[60:]` for rows the run did not train on), rendered by Axolotl's own RL
dataset loader with that entry's `type:` (any type `axolotl train` accepts: a named
DPO strategy, `chat_template.*` with the tokenizer's template, a dict `type:`) and
its length filter, then tokenised as TRL's DPO trainer tokenises them, so they are
scored exactly as training sees its pairs. A log-prob margin rather than DPO's implicit
reward: the base model's implicit reward against itself is zero for every pair.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...spa.judge import encode_like_trl, sequence_logprobs

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


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


def _axolotl_rl_split(cfg: Any) -> Any:
    """Axolotl's own RL dataset loader for `cfg.datasets`, as `axolotl train` runs
    it for a DPO-family run: each entry read, its `type:` loaded with the config
    and the entry's index (a dict `type:` as `user_defined.default`), the
    tokenizer handed to transforms that take one, then the length filter."""
    try:  # the same private function in Axolotl 0.19 and 0.21
        from axolotl.utils.data.rl import _load_split
    except ImportError as err:  # pragma: no cover - depends on the Axolotl release
        raise ImportError(
            "prefalign eval-pairs needs axolotl.utils.data.rl._load_split (Axolotl "
            f"0.19 to 0.21); this Axolotl has none: {err}"
        ) from err
    return _load_split(cfg, split="train")


def preference_dataset(cfg: Any, split: str, dataset_index: int = 0) -> Any:
    """The prompt/chosen/rejected rows of one `datasets:` entry read with `split`,
    rendered by Axolotl's RL loader exactly as a DPO run's training rows are."""
    from axolotl.utils.dict import DictDefault

    entries = cfg.get("datasets") or []
    if not 0 <= dataset_index < len(entries):
        raise ValueError(
            f"--dataset {dataset_index}: the YAML has {len(entries)} datasets: entries"
        )
    entry = DictDefault({**entries[dataset_index], "split": split})
    with tempfile.TemporaryDirectory(prefix="prefalign-eval-pairs-") as prepared:
        # Only this entry, in file order; Axolotl's copy of the prepared rows goes
        # to a scratch folder, never over the training run's prepared dataset.
        run_cfg = DictDefault(
            {
                **cfg,
                "datasets": [entry],
                "shuffle_merged_datasets": False,
                "dataset_prepared_path": prepared,
                "push_dataset_to_hub": None,
            }
        )
        dataset = _axolotl_rl_split(run_cfg)
    missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"datasets[{dataset_index}] ({entry.get('path')}): the rendered rows have "
            f"no {', '.join(missing)} column (columns: {dataset.column_names}); set "
            "the entry's type: to the DPO type of its columns, e.g. "
            "chat_template.default"
        )
    return dataset


def load_pairs(
    cfg: Any, split: str, dataset_index: int = 0, tokenizer: Any = None
) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of one `datasets:` entry read with `split`,
    rendered by Axolotl's RL loader and the chat template as TRL does."""
    from axolotl.loaders import load_tokenizer

    dataset = preference_dataset(cfg, split, dataset_index)
    tokenizer = load_tokenizer(cfg) if tokenizer is None else tokenizer
    return pair_texts(dataset, tokenizer)


def pair_texts(dataset: Any, tokenizer: Any) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of rendered preference rows, with the chat
    template applied to conversational rows and EOS ended as TRL's DPO trainer does."""
    from trl.data_utils import maybe_apply_chat_template

    eos = tokenizer.eos_token or ""
    out = []
    for row in dataset:
        row = maybe_apply_chat_template({k: row[k] for k in PAIR_COLUMNS}, tokenizer)
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

    tokenizer = load_tokenizer(cfg)
    pairs = load_pairs(cfg, split, dataset_index, tokenizer)
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
