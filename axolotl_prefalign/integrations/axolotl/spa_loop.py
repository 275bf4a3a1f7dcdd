"""The SPA loop with Axolotl as the trainer: `axolotl prefalign spa CONFIG`.

Seed DPO, then N rounds of expand → train (METHODS.md §1); the stages run as
subprocesses (`axolotl train`, `axolotl merge-lora`, `axolotl prefalign
spa-expand`), and the layout, resumable state and statistics come from `spa.loop`.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from ...core.config import SpaConfig, prefalign_config
from ...core.shards import atomic_write_json, atomic_write_text, main_process_only
from ...spa.loop import (
    EXPAND_SETTINGS,
    LOG,
    LOOP_ONLY,
    STATE_FILE,
    SUMMARY_FILE,
    WEIGHT_FILES,
    Runner,
    SpaLoopError,
    SpaState,
    StageRunner,
    absolute,
    expansion_done,
    has_weights,
    is_adapter_run,
    iter_dir,
    iteration_prompts,
    load_policy,
    original_base,
    pair_files,
    policy_spec,
    run_command,
    short_sha,
    summary_table,
    training_stats,
)

PLUGIN = "axolotl_prefalign.PrefAlignPlugin"
PAIRS_TYPE = "axolotl_prefalign.spa_pairs"


def expand_from_config(
    cfg: Any,
    iteration: int,
    model_path: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """`axolotl prefalign spa-expand CONFIG -i I`: the pairs of iteration I from
    π_{I−1}; returns the expansion summary."""
    from axolotl.loaders import load_tokenizer

    from ...spa.expand import (
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
    parts = iteration_prompts(spa, pa.on_bad_row)
    prompts = parts[iteration - 1]
    source = spa.prompts[min(iteration, len(spa.prompts)) - 1].path
    out = Path(out_dir) if out_dir else iter_dir(cfg.get("output_dir"), iteration)
    spec = policy_spec(cfg, iteration, model_path)
    tokenizer = load_tokenizer(cfg)
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


def _axolotl(*args: str) -> list[str]:
    return [sys.executable, "-m", "axolotl.cli.main", *args]


def train_command(config: Path, launcher: str) -> list[str]:
    """`axolotl train CONFIG --launcher L`."""
    return _axolotl("train", str(config), "--launcher", launcher)


def merge_command(config: Path) -> list[str]:
    """`axolotl merge-lora CONFIG` (writes output_dir/merged)."""
    return _axolotl("merge-lora", str(config))


def expand_command(config: Path, iteration: int, out: Path) -> list[str]:
    """`axolotl prefalign spa-expand CONFIG --iteration I --out DIR`."""
    return _axolotl(
        "prefalign",
        "spa-expand",
        str(config),
        "--iteration",
        str(iteration),
        "--out",
        str(out),
    )


def stage_config(
    raw: dict[str, Any],
    spa: SpaConfig,
    iteration: int,
    *,
    base_model: str,
    tokenizer: str,
    out: Path,
    pairs: list[str] | None,
) -> dict[str, Any]:
    """The training YAML of one stage, derived from the user's YAML."""
    c = copy.deepcopy(raw)
    for key in ("lora_model_dir", "resume_from_checkpoint", "base_model_config"):
        c.pop(key, None)
    c["base_model"] = base_model
    c["tokenizer_config"] = tokenizer
    c["rl"] = "dpo"
    c["output_dir"] = str(out)
    c["dataset_prepared_path"] = str(out / "prepared")
    pf = copy.deepcopy(raw.get("prefalign") or {})
    # The trainer reads only the loss-side spa settings; leaving out the loop's
    # own (prompts, sampling, ...) keeps a change there from staling finished
    # training stages.
    spa_block = {k: v for k, v in (pf.get("spa") or {}).items() if k not in LOOP_ONLY}
    pf["spa"] = {**spa_block, "iteration": iteration}
    if iteration == 0:
        # Seed DPO is plain DPO (sigmoid) on the labelled seed, for seed_epochs.
        c["num_epochs"] = spa.seed_epochs
        pf["loss"] = "sigmoid"
        pf.pop("label_smoothing", None)
    else:
        c["num_epochs"] = 1
        c["datasets"] = [
            {
                "path": str(out / "pairs"),
                "ds_type": "json",
                "data_files": pairs,
                "split": "train",
                "type": PAIRS_TYPE,
            }
        ]
        pf["loss"] = pf.get("loss") or "spa"
    c["prefalign"] = pf
    if c.get("rl_beta") is None and not (c.get("trl") or {}).get("beta"):
        c["rl_beta"] = spa.beta
    return c


def run_from_config(
    cfg: Any, config_path: str | Path, runner: Runner | None = None
) -> dict[str, Any]:
    """`axolotl prefalign spa CONFIG`: seed DPO, then expand → train per iteration;
    resumable at stage granularity. Returns the summary (also `spa_summary.json`)."""
    import yaml

    if not main_process_only("the SPA loop"):
        return {}
    config_path = Path(config_path).resolve()
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if PLUGIN not in (raw.get("plugins") or []):
        raise SpaLoopError(f"the SPA loop needs `plugins: [{PLUGIN}]` in {config_path}")
    if raw.get("rl") not in (None, "dpo"):
        raise SpaLoopError(f"SPA trains with rl: dpo, the YAML has rl: {raw['rl']}")
    pa = prefalign_config(cfg)
    spa = pa.spa
    iteration_prompts(spa, pa.on_bad_row)  # bad prompt settings fail before training
    out = Path(cfg.get("output_dir")).resolve()
    base = original_base(cfg)
    tok = cfg.get("tokenizer_config")
    tokenizer = base if tok in (None, raw.get("base_model")) else absolute(tok)
    adapter = is_adapter_run(cfg)
    spa_sha = short_sha(
        json.dumps(spa.model_dump(include=EXPAND_SETTINGS), sort_keys=True)
    )
    loop = StageRunner(SpaState(out / STATE_FILE), runner or run_command)
    rows: list[dict[str, Any]] = []

    for i in range(spa.iterations + 1):
        d = iter_dir(out, i)
        d.mkdir(parents=True, exist_ok=True)
        expansion, pairs = None, None
        if i > 0:
            loop.stage(
                f"iter_{i}/expand",
                spa_sha + f"-{i}",
                expand_command(config_path, i, d),
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
        base_i = base if i == 0 else str(prev / "merged" if adapter else prev)
        conf = stage_config(
            raw, spa, i, base_model=base_i, tokenizer=tokenizer, out=d, pairs=pairs
        )
        text = yaml.safe_dump(conf, sort_keys=False, allow_unicode=True)
        atomic_write_text(d / "config.yml", text)
        loop.stage(
            f"iter_{i}/train",
            short_sha(text),
            train_command(d / "config.yml", spa.launcher),
            d / "train.log",
            lambda d=d: has_weights(d),
            [*d.glob("checkpoint-*"), *(d / n for n in WEIGHT_FILES), d / "prepared"],
        )
        if adapter:
            loop.stage(
                f"iter_{i}/merge",
                short_sha(text),
                merge_command(d / "config.yml"),
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
        atomic_write_json(d / "metrics.json", metrics)
        rows.append(metrics)

    last = iter_dir(out, spa.iterations)
    final = last / "merged" if adapter else last
    summary = {"final_model": str(final), "iterations": rows}
    atomic_write_json(out / SUMMARY_FILE, summary)
    LOG.info("SPA finished; final model: %s", final)
    print(summary_table(rows), flush=True)
    return summary
