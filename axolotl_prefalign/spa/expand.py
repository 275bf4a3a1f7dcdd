"""SPA expansion: sample K responses per fresh prompt from π_{i−1}, judge them with
the implicit reward, and write the pairs (docs/methods.md#spa: generate, judge).

Output under `out_dir`, every part an atomic `ShardWriter` folder:
- `generations/`  one row per prompt: `index`, `prompt`, the K `responses`
- `pairs/`        one row per judged pair: `prompt`, `chosen`, `rejected`,
                  `judge_prob`, `margin`, `iteration`, `index`, `rewards`,
                  `chosen_tokens`, `rejected_tokens` (the training data)
- `dropped/`      prompts without a pair and why (`equal_reward`, `identical_text`,
                  `empty`), with their responses and rewards
- `summary.json`  the counts and means also logged and stored in the manifest.

Prompts are processed in fixed blocks of `shard_size` (one shard each); a block's
sampling seed is derived from the source index of its first prompt, so a resumed run
writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.config import SpaConfig
from ..core.rows import RowChecker, text_problem
from ..core.shards import ShardWriter, atomic_write_json, read_shards
from .judge import EMPTY_RESPONSE, EQUAL_REWARD, IDENTICAL_TEXT, judge_pairs
from .pairs import prompt_text

LOG = logging.getLogger("axolotl_prefalign")

# (rendered prompts, seed) -> K response texts per prompt.
GenerateFn = Callable[[list[str], int], list[list[str]]]
SUMMARY_FILE = "summary.json"


def hf_generator(model: Any, tokenizer: Any, spa: SpaConfig) -> GenerateFn:
    """Sampling with transformers' `generate` (batched, KV cache)."""
    from ..core.generation import generate

    def run(texts: list[str], seed: int) -> list[list[str]]:
        gens = generate(
            model,
            tokenizer,
            texts,
            max_new_tokens=spa.max_new_tokens,
            temperature=spa.temperature,
            top_p=spa.top_p,
            num_return_sequences=spa.num_samples,
            batch_size=spa.generation_batch_size,
            seed=seed,
            desc="sampling",
        )
        return [[g.text for g in per_prompt] for per_prompt in gens]

    return run


class VllmGenerator:
    """Sampling with vLLM (a model folder, not an in-memory model).

    Untested in this repository's CI (no GPU there); kept deliberately small."""

    def __init__(self, model_path: str, tokenizer: Any, spa: SpaConfig):
        from vllm import LLM

        self.tokenizer, self.spa = tokenizer, spa
        self.llm = LLM(model=model_path, seed=spa.seed, gpu_memory_utilization=0.85)

    def __call__(self, texts: list[str], seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=self.spa.num_samples,
                temperature=self.spa.temperature,
                top_p=self.spa.top_p,
                max_tokens=self.spa.max_new_tokens,
                seed=seed + k,  # per prompt: independent of vLLM's scheduling
            )
            for k in range(len(texts))
        ]
        # Token ids: the rendered template already holds any BOS.
        inputs = [
            {
                "prompt_token_ids": self.tokenizer(t, add_special_tokens=False)[
                    "input_ids"
                ]
            }
            for t in texts
        ]
        outs = self.llm.generate(inputs, params, use_tqdm=True)
        return [[o.text.strip() for o in out.outputs] for out in outs]

    def close(self) -> None:
        """Free the engine's GPU memory before the judge models load."""
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def choose_backend(spa: SpaConfig) -> str:
    """'vllm' when asked for or (auto) when installed with CUDA; else 'hf'."""
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    usable = has_vllm and torch.cuda.is_available()
    if spa.generation_backend == "vllm" and not usable:
        raise RuntimeError(
            "prefalign.spa.generation_backend: vllm needs the vllm package and a CUDA "
            "GPU; use generation_backend: auto or hf"
        )
    if spa.generation_backend == "hf":
        return "hf"
    return "vllm" if usable else "hf"


def prompt_rows(prompts: Any) -> list[tuple[int, Any]]:
    """(source index, prompt) pairs of a prompts Dataset (or list of dicts)."""
    rows = prompts.to_list() if hasattr(prompts, "to_list") else list(prompts)
    return [(int(r.get("index", pos)), r.get("prompt")) for pos, r in enumerate(rows)]


def prepare_prompts(
    prompts: Any,
    tokenizer: Any,
    *,
    max_prompt_tokens: int | None,
    on_bad_row: str = "error",
    source: str = "SPA prompts",
) -> tuple[list[tuple[int, str]], RowChecker]:
    """Valid prompts within the token limit (bad rows raise or are counted)."""
    checker = RowChecker(source, on_bad_row)
    kept: list[tuple[int, str]] = []
    for index, prompt in prompt_rows(prompts):
        problem = text_problem({"prompt": prompt}, "prompt")
        if problem:
            checker.bad(index, "prompt", problem)
            continue
        prompt = prompt.strip()
        if max_prompt_tokens is not None:
            n = len(tokenizer(prompt_text(tokenizer, prompt))["input_ids"])
            if n > max_prompt_tokens:
                checker.bad(
                    index,
                    "prompt",
                    f"{n} tokens > prefalign.spa.max_prompt_tokens "
                    f"({max_prompt_tokens})",
                )
                continue
        kept.append((index, prompt))
    checker.report()
    return kept, checker


def prompts_fingerprint(kept: Sequence[tuple[int, str]]) -> str:
    """A hash of the exact prompts (and their indices) an expansion covers."""
    h = hashlib.sha256()
    for index, prompt in kept:
        h.update(f"{index}\x00{prompt}\x01".encode())
    return h.hexdigest()[:16]


def expansion_meta(
    spa: SpaConfig,
    iteration: int,
    kept: Sequence[tuple[int, str]],
    *,
    model_id: str,
    init_model_id: str,
    backend: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generation meta, judgment meta): every setting that determines the rows."""
    gen = {
        "iteration": iteration,
        "model": model_id,
        "prompts": len(kept),
        "prompts_sha": prompts_fingerprint(kept),
        "num_samples": spa.num_samples,
        "temperature": spa.temperature,
        "top_p": spa.top_p,
        "max_new_tokens": spa.max_new_tokens,
        "seed": spa.seed,
        "generation_batch_size": spa.generation_batch_size,
        "shard_size": spa.shard_size,
        "backend": backend,
    }
    judge = {
        **gen,
        "init_model": init_model_id,
        "beta": spa.beta,
        "length_normalized": spa.length_normalized,
        "judge_batch_size": spa.judge_batch_size,
    }
    return gen, judge


def block_seed(spa: SpaConfig, iteration: int, first_index: int) -> int:
    """The sampling seed of the block whose first prompt has `first_index`."""
    return spa.seed + 1_000_003 * iteration + first_index


def _blocks(kept: list[tuple[int, str]], size: int) -> list[list[tuple[int, str]]]:
    return [kept[s : s + size] for s in range(0, len(kept), size)]


def _block_done(block: list[tuple[int, str]], done: set[int], where: Path) -> bool:
    covered = sum(index in done for index, _ in block)
    if 0 < covered < len(block):
        raise RuntimeError(
            f"{where}: a shard covers only part of a block of prompts; the output was "
            "written with other settings: delete the folder and run again"
        )
    return covered == len(block)


def generate_responses(
    kept: list[tuple[int, str]],
    generator: GenerateFn,
    tokenizer: Any,
    spa: SpaConfig,
    out_dir: str | Path,
    iteration: int,
    meta: dict[str, Any],
) -> None:
    """Step a: K responses per prompt into `out_dir/generations` (resumable)."""
    writer = ShardWriter(Path(out_dir) / "generations", meta)
    if writer.complete:
        return
    done = writer.done_indices()
    todo = [
        b for b in _blocks(kept, spa.shard_size) if not _block_done(b, done, writer.dir)
    ]
    for block in tqdm(todo, desc=f"SPA iteration {iteration}: sampling", unit="shard"):
        texts = [prompt_text(tokenizer, p) for _, p in block]
        responses = generator(texts, block_seed(spa, iteration, block[0][0]))
        if len(responses) != len(block):
            raise RuntimeError(
                f"generator returned {len(responses)} results for {len(block)} prompts"
            )
        rows = [
            {"index": index, "prompt": prompt, "responses": list(resps)}
            for (index, prompt), resps in zip(block, responses, strict=True)
        ]
        writer.write(rows, [index for index, _ in block])
    writer.finish()


def finished_summary(out_dir: str | Path, meta: dict[str, Any]) -> dict | None:
    """The stored summary when `out_dir` already holds a complete expansion made
    with these settings; None when (part of) it still has to run."""
    manifest = Path(out_dir) / "pairs" / "manifest.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text(encoding="utf-8"))
    if data.get("complete") and data.get("meta") == meta:
        return data.get("summary")
    return None


def expand(
    prompts: Any,
    model: Any,
    tokenizer: Any,
    init_model: Any,
    spa_cfg: SpaConfig,
    out_dir: str | Path,
    iteration: int,
    *,
    generator: GenerateFn | None = None,
    chunk_size: int | None = None,
    on_bad_row: str = "error",
    source: str = "SPA prompts",
    model_id: str | None = None,
    init_model_id: str | None = None,
    backend: str = "hf",
) -> dict[str, Any]:
    """Sample, judge and write the pairs of one SPA iteration; returns the summary.

    `prompts` has `prompt` (and the source row `index`) columns. `init_model=None`
    judges against `model` with its adapter disabled. Safe to call again after a
    crash: finished shards are kept, the rest is done once."""
    out = Path(out_dir)
    kept, checker = prepare_prompts(
        prompts,
        tokenizer,
        max_prompt_tokens=spa_cfg.max_prompt_tokens,
        on_bad_row=on_bad_row,
        source=source,
    )
    if not kept:
        raise ValueError(f"{source}: no usable prompts for SPA iteration {iteration}")
    model_id = model_id or _name(model)
    init_model_id = init_model_id or (
        "adapter-disabled" if init_model is None else _name(init_model)
    )
    gen_meta, meta = expansion_meta(
        spa_cfg,
        iteration,
        kept,
        model_id=model_id,
        init_model_id=init_model_id,
        backend=backend,
    )
    done_summary = finished_summary(out, meta)
    if done_summary is not None:
        LOG.info("SPA iteration %d: expansion already complete in %s", iteration, out)
        return done_summary

    generate_responses(
        kept,
        generator or hf_generator(model, tokenizer, spa_cfg),
        tokenizer,
        spa_cfg,
        out,
        iteration,
        gen_meta,
    )
    generated = {r["index"]: r for r in read_shards(out / "generations")}
    pairs = ShardWriter(out / "pairs", meta)
    dropped = ShardWriter(out / "dropped", meta)
    done = pairs.done_indices()
    todo = [
        b
        for b in _blocks(kept, spa_cfg.shard_size)
        if not _block_done(b, done, pairs.dir)
    ]
    for block in tqdm(todo, desc=f"SPA iteration {iteration}: judging", unit="shard"):
        rows = [generated[index] for index, _ in block]
        judgments = judge_pairs(
            model,
            tokenizer,
            [r["prompt"] for r in rows],
            [r["responses"] for r in rows],
            init_model=init_model,
            beta=spa_cfg.beta,
            length_normalized=spa_cfg.length_normalized,
            batch_size=spa_cfg.judge_batch_size,
            chunk_size=chunk_size,
            # Per block, so a resumed run batches (and rounds) exactly as before.
            reference_cache={},
        )
        kept_rows, dropped_rows = [], []
        for row, j in zip(rows, judgments, strict=True):
            if j.dropped:
                dropped_rows.append(
                    {
                        "index": row["index"],
                        "prompt": row["prompt"],
                        "reason": j.dropped,
                        "responses": row["responses"],
                        "rewards": j.rewards,
                    }
                )
                continue
            kept_rows.append(
                {
                    "prompt": row["prompt"],
                    "chosen": j.chosen,
                    "rejected": j.rejected,
                    "judge_prob": j.judge_prob,
                    "margin": j.margin,
                    "iteration": iteration,
                    "index": row["index"],
                    "rewards": j.rewards,
                    "chosen_tokens": j.chosen_tokens,
                    "rejected_tokens": j.rejected_tokens,
                }
            )
        # Dropped rows first: if we crash before the pairs shard, the rerun
        # recomputes the same drops and must not record them twice.
        already = dropped.done_indices()
        fresh = [r for r in dropped_rows if r["index"] not in already]
        if fresh:
            dropped.write(fresh, [r["index"] for r in fresh])
        pairs.write(kept_rows, [index for index, _ in block])

    summary = summarize(out, iteration, checker)
    dropped.finish()
    pairs.finish(summary)
    atomic_write_json(out / SUMMARY_FILE, summary)
    LOG.info(
        "SPA iteration %d: %d pairs from %d prompts; dropped %d ties (%d equal reward, "
        "%d identical text) and %d with < 2 non-empty responses; mean |margin| %s; "
        "mean length chosen %s / rejected %s tokens",
        iteration,
        summary["pairs"],
        summary["prompts"],
        summary["ties_dropped"],
        summary["dropped_equal_reward"],
        summary["dropped_identical_text"],
        summary["dropped_empty"],
        _fmt(summary["mean_abs_margin"], 4),
        _fmt(summary["chosen_mean_tokens"], 1),
        _fmt(summary["rejected_mean_tokens"], 1),
    )
    return summary


def _name(model: Any) -> str:
    name = getattr(model, "name_or_path", None)
    if not name:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name or type(model).__name__)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float]) -> float | None:
    # None (JSON null) rather than NaN when there is nothing to average.
    return sum(values) / len(values) if values else None


def summarize(
    out_dir: str | Path, iteration: int, checker: RowChecker
) -> dict[str, Any]:
    """Counts and means of an expansion, from what its shards hold."""
    out = Path(out_dir)
    pairs = list(read_shards(out / "pairs"))
    reasons = Counter(r["reason"] for r in read_shards(out / "dropped"))
    chosen = [r["chosen_tokens"] for r in pairs]
    rejected = [r["rejected_tokens"] for r in pairs]
    return {
        "iteration": iteration,
        "prompts": len(pairs) + sum(reasons.values()),
        "prompts_skipped": checker.n_skipped,
        "skip_reasons": dict(checker.skipped),
        "pairs": len(pairs),
        "ties_dropped": reasons[EQUAL_REWARD] + reasons[IDENTICAL_TEXT],
        "dropped_equal_reward": reasons[EQUAL_REWARD],
        "dropped_identical_text": reasons[IDENTICAL_TEXT],
        "dropped_empty": reasons[EMPTY_RESPONSE],
        "mean_abs_margin": _mean([abs(r["margin"]) for r in pairs]),
        "mean_judge_prob": _mean([r["judge_prob"] for r in pairs]),
        "chosen_mean_tokens": _mean(chosen),
        "rejected_mean_tokens": _mean(rejected),
        "chosen_longer_fraction": _mean(
            [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
        ),
    }
