"""The SPA loop: seed DPO, then N rounds of expand → train (docs/methods.md#spa).

Everything lives under the YAML's `output_dir`:

    iter_0/            seed DPO on the labelled seed (the YAML's own datasets)
    iter_<i>/          iteration i: generations/, pairs/, dropped/, summary.json
                       (the expansion), config.yml (the generated training YAML),
                       the trained adapter or model with its model card
                       (README.md), merged/ (LoRA: π_i as a full model; the last
                       one's README.md is the final model's card, with this
                       loop's table), metrics.json, *.log (each stage's output)
    spa_state.json     finished stages (a rerun skips them)
    spa_summary.json   per-iteration statistics (also printed as a table)

Each stage runs as a subprocess (for Axolotl: `axolotl train`, `axolotl merge-lora`,
`axolotl prefalign spa-expand`), so this module only orchestrates. Iteration i
trains π_i from π_{i−1} for one epoch with `prefalign.loss: spa` and
`prefalign.spa.iteration: i`; the DPO reference is π_{i−1}: with LoRA, a fresh
adapter on `iter_<i-1>/merged` (adapter disabled = π_{i−1}); with full fine-tuning,
the previous output as base_model. The judge's π_init is always the ORIGINAL base
model (the SFT model): with LoRA, the adapters of iterations 0..i−1 are stacked on
it (all active = π_{i−1}, all disabled = π_init), so one model serves both.

The pieces live beside this module: `prompts` (each iteration's fresh prompts),
`policy` (the judge's models), `stages` (resumable subprocess stages), `settings`
(what each SPA setting affects), `layout` (the folders), `report` (statistics,
gold reports, tables); their public names are importable from here too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..core.config import SpaConfig
from ..core.shards import atomic_write_json, main_process_only
from .errors import SpaLoopError
from .layout import (
    STATE_FILE,
    SUMMARY_FILE,
    WEIGHT_FILES,
    expansion_done,
    has_weights,
    iter_dir,
    pair_files,
)
from .policy import (
    PolicySpec,
    absolute,
    is_adapter_run,
    load_policy,
    original_base,
    policy_spec,
)
from .prompts import iteration_prompts, load_prompts
from .report import (
    card_table,
    finished_rows,
    flags_path,
    gold_table,
    history_stats,
    summary_table,
    training_stats,
    write_gold_report,
)
from .settings import expansion_settings, stage_prefalign
from .stages import (
    Runner,
    SpaState,
    StageRunner,
    expand_key,
    run_command,
    short_sha,
    stage_env,
)

__all__ = [
    "STATE_FILE",
    "SUMMARY_FILE",
    "WEIGHT_FILES",
    "PolicySpec",
    "Runner",
    "SpaLoopError",
    "SpaState",
    "StageRunner",
    "Trainings",
    "absolute",
    "card_table",
    "expand_iteration",
    "expand_key",
    "expansion_done",
    "finished_rows",
    "flags_path",
    "gold_table",
    "has_weights",
    "history_stats",
    "is_adapter_run",
    "iter_dir",
    "iteration_prompts",
    "load_policy",
    "load_prompts",
    "original_base",
    "pair_files",
    "policy_spec",
    "run_command",
    "run_stages",
    "short_sha",
    "stage_env",
    "stage_prefalign",
    "summary_table",
    "training_stats",
    "write_gold_report",
]

LOG = logging.getLogger("axolotl_prefalign")


def expand_iteration(
    cfg: Any,
    iteration: int,
    load_tokenizer: Callable[[], Any],
    model_path: str | None = None,
    out_dir: str | None = None,
    prompts: Any = None,
) -> dict[str, Any]:
    """The pairs of iteration I from π_{I−1} (the loop's layout, or `model_path`),
    written to `out_dir` (default `iter_<I>`); returns the expansion summary. `cfg`
    holds the keys an Axolotl YAML names them by (base_model, output_dir, adapter,
    bf16, load_in_4bit, prefalign); `prompts` replaces iteration I's own prompts
    (the premise check's sample)."""
    from ..core.config import prefalign_config
    from .expand import (
        VllmGenerator,
        choose_backend,
        expand,
        expansion_meta,
        finished_summary,
        generate_responses,
        prepare_prompts,
    )

    pa = prefalign_config(cfg)
    spa = pa.spa
    if not main_process_only("SPA expansion"):
        return {}
    if not 1 <= iteration <= spa.iterations:
        raise SpaLoopError(
            f"--iteration must be in 1..{spa.iterations} (prefalign.spa.iterations)"
        )
    if prompts is None:
        prompts = iteration_prompts(spa, pa.on_bad_row)[iteration - 1]
    source = spa.prompts[min(iteration, len(spa.prompts)) - 1].path
    out = Path(out_dir) if out_dir else iter_dir(cfg.get("output_dir"), iteration)
    spec = policy_spec(cfg, iteration, model_path)
    tokenizer = load_tokenizer()
    backend = choose_backend(spa)
    auto = spa.generation_backend == "auto"
    if backend == "vllm" and spec.vllm_path is None and auto:
        # vLLM loads one model folder; π_{i−1} as stacked adapters is HF-only. Decided
        # before expansion_meta, which records the backend that generated the pairs.
        LOG.info(
            "SPA iteration %d: π_%d is not one model folder; generating with HF",
            iteration,
            iteration - 1,
        )
        backend = "hf"
    kept, _ = prepare_prompts(
        prompts,
        tokenizer,
        max_prompt_tokens=spa.max_prompt_tokens,
        on_bad_row=pa.on_bad_row,
        source=source,
    )
    gen_meta, meta = expansion_meta(
        spa,
        iteration,
        kept,
        model_id=spec.model_id,
        init_model_id=spec.init_id,
        backend=backend,
    )
    done = finished_summary(out, meta)
    if done is not None:
        LOG.info("SPA iteration %d: expansion already complete in %s", iteration, out)
        return done
    LOG.info(
        "SPA iteration %d: generation and judging run in this one process, on one "
        "device (only the train stages run on several processes)",
        iteration,
    )
    if backend == "vllm":
        if spec.vllm_path is None:
            raise SpaLoopError(
                f"vLLM needs π_{iteration - 1} as one model folder (e.g. "
                f"iter_{iteration - 1}/merged); set generation_backend: hf"
            )
        generator = VllmGenerator(spec.vllm_path, tokenizer, spa)
        try:
            generate_responses(
                kept, generator, tokenizer, spa, out, iteration, gen_meta
            )
        finally:
            generator.close()
    model, init = load_policy(spec, cfg)
    return expand(
        prompts,
        model,
        tokenizer,
        init,
        spa,
        out,
        iteration,
        chunk_size=pa.chunk_size,
        on_bad_row=pa.on_bad_row,
        source=source,
        model_id=spec.model_id,
        init_model_id=spec.init_id,
        backend=backend,
    )


class Trainings(Protocol):
    """What the loop needs from a training framework (Axolotl, LLaMA-Factory)."""

    adapter: bool  # LoRA/QLoRA: each stage also merges, π_i = iter_i/merged
    base: str  # π_init, the original base model

    def expand_command(self, iteration: int, out: Path) -> list[str]:
        """The command that writes iteration `iteration`'s expansion into `out`."""

    def write_train_config(
        self, iteration: int, base_model: str, out: Path, pairs: list[str] | None
    ) -> tuple[Path, str]:
        """Write one stage's training config under `out`: (its path, its text)."""

    def train_command(self, config: Path) -> list[str]:
        """The command that trains one stage from its config."""

    def merge_command(self, config: Path) -> list[str]:
        """The command that merges a LoRA stage into `out/merged`."""


def run_stages(
    spa: SpaConfig,
    out: Path,
    trainings: Trainings,
    runner: Runner | None = None,
    on_bad_row: str = "error",
) -> dict[str, Any]:
    """Seed DPO, then expand → train per iteration, each stage through `trainings`;
    resumable at stage granularity; with gold answers each iteration also writes
    its gold report. Returns the summary (also `spa_summary.json`)."""
    settings = expansion_settings(spa)
    loop = StageRunner(SpaState(out / STATE_FILE), runner or run_command)
    adapter = trainings.adapter
    rows: list[dict[str, Any]] = []
    parts = iteration_prompts(spa, on_bad_row)
    gold_prompts = parts if spa.has_gold else None

    for i in range(spa.iterations + 1):
        d = iter_dir(out, i)
        d.mkdir(parents=True, exist_ok=True)
        expansion, pairs = None, None
        if i > 0:
            loop.stage(
                f"iter_{i}/expand",
                expand_key(settings, parts[i - 1]),
                trainings.expand_command(i, d),
                d / "expand.log",
                lambda d=d: expansion_done(d),
                [d / "generations", d / "pairs", d / "dropped", d / "summary.json"],
            )
            expansion = json.loads((d / "summary.json").read_text(encoding="utf-8"))
            if not expansion["pairs"]:
                raise SpaLoopError(
                    f"iteration {i} produced no pairs ({expansion['prompts']} prompts, "
                    f"{expansion['ties_dropped']} ties, {expansion['dropped_empty']} "
                    "empty); use more prompts or a larger max_new_tokens"
                )
            pairs = pair_files(d)
        prev = iter_dir(out, i - 1)
        base_i = trainings.base if i == 0 else str(prev / "merged" if adapter else prev)
        config, text = trainings.write_train_config(i, base_i, d, pairs)
        loop.stage(
            f"iter_{i}/train",
            short_sha(text),
            trainings.train_command(config),
            d / "train.log",
            lambda d=d: has_weights(d),
            [
                *d.glob("checkpoint-*"),
                *(d / n for n in WEIGHT_FILES),
                d / "prepared",
                *d.glob("spa_flags.jsonl*"),
            ],
        )
        if adapter:
            loop.stage(
                f"iter_{i}/merge",
                short_sha(text),
                trainings.merge_command(config),
                d / "merge.log",
                lambda d=d: has_weights(d / "merged"),
                [d / "merged"],
            )
        metrics = {
            "iteration": i,
            "stage": "seed DPO" if i == 0 else "SPA",
            "base_model": base_i,
            "expansion": expansion,
            "training": training_stats(d),
        }
        if gold_prompts is not None and i > 0:
            from .gold import gold_summary

            report = write_gold_report(spa, i, d, gold_prompts[i - 1])
            metrics["gold"] = gold_summary(report)
        atomic_write_json(d / "metrics.json", metrics)
        rows.append(metrics)

    last = iter_dir(out, spa.iterations)
    final = last / "merged" if adapter else last
    summary = {"final_model": str(final), "iterations": rows}
    atomic_write_json(out / SUMMARY_FILE, summary)
    LOG.info("SPA finished; final model: %s", final)
    print(summary_table(rows), flush=True)
    if gold_prompts is not None:
        print(gold_table(rows), flush=True)
    return summary
