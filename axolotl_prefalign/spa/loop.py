"""The SPA loop: seed DPO, then N rounds of expand → train (METHODS.md §1).

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
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from ..core.config import SpaConfig, SpaPromptSource
from ..core.rows import RowChecker, text_problem
from ..core.shards import atomic_write_json, main_process_only

LOG = logging.getLogger("axolotl_prefalign")

STATE_FILE = "spa_state.json"
SUMMARY_FILE = "spa_summary.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Settings that decide an expansion's rows (a change makes finished ones stale).
EXPAND_SETTINGS = {
    "beta",
    "num_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "generation_batch_size",
    "judge_batch_size",
    "generation_backend",
    "shard_size",
    "max_prompt_tokens",
    "length_normalized",
    "init_model",
    "prompts",
    "prompts_per_iteration",
    "seed",
}
# Settings that pick each iteration's prompts: they enter an expansion's key through
# the prompts they pick (with `iterations`, which splits one source), so a changed
# split is a changed expansion and gold fields on a source change nothing.
SPLIT_SETTINGS = {"prompts", "prompts_per_iteration"}
# spa settings only the loop and the expansion read (not the trainer).
LOOP_ONLY = (EXPAND_SETTINGS - {"beta"}) | {
    "iterations",
    "seed_epochs",
    "launcher",
    "gold_checker",
    "flags_file",  # the loop sets the trainer's own (stage_prefalign)
}

# (command, log file) -> None; raises on failure. Tests inject their own.
Runner = Callable[[list[str], Path], None]


class SpaLoopError(RuntimeError):
    """The SPA loop cannot go on (bad settings, a failed stage, missing outputs)."""


# -- prompts -------------------------------------------------------------------


def load_prompts(
    source: SpaPromptSource, on_bad_row: str = "error", gold_checker: str = "choice"
):
    """A source's prompts as a Dataset with `index` (source row) and `prompt`;
    with `gold_field` also `gold` (resolved for the checker, None where a row's
    gold is unusable under on_bad_row: skip) and `options` (list, maybe empty)."""
    from datasets import Dataset

    from ..core.local_data import DataFileError, read_local

    checker = RowChecker(str(source.path), on_bad_row)
    try:
        data = read_local(
            source.path, split=source.split, checker=checker, name=source.name
        )
    except DataFileError as err:
        raise SpaLoopError(f"prefalign.spa.prompts: {err}") from None
    checker.lines = data.lines
    _check_gold_columns(source, data.rows)
    columns: dict[str, list] = {"index": [], "prompt": []}
    if source.gold_field:
        columns.update(gold=[], options=[])
    # A bad gold never drops a prompt (it would change training): an error, or
    # under skip a pair the report counts as unknown (no_gold).
    gold_rows = RowChecker(str(source.path), on_bad_row, lines=data.lines)
    for idx, row in enumerate(data.rows):
        problem = text_problem(row, source.field)
        if problem:
            checker.bad(idx, source.field, problem)
            continue
        columns["index"].append(data.positions[idx])
        columns["prompt"].append(row[source.field].strip())
        if source.gold_field:
            gold, options = _row_gold(source, row, idx, gold_checker, gold_rows)
            columns["gold"].append(gold)
            columns["options"].append(options)
    checker.report()
    if gold_rows.n_skipped:
        detail = "; ".join(f"{n} × {why}" for why, n in gold_rows.skipped.most_common())
        LOG.warning(
            "%s: %d prompt(s) without a usable gold answer (kept for training, "
            "unknown in the gold report): %s",
            source.path,
            gold_rows.n_skipped,
            detail,
        )
    return Dataset.from_dict(columns)


def _check_gold_columns(source: SpaPromptSource, rows: list[dict]) -> None:
    for key in ("gold_field", "gold_options_field"):
        name = getattr(source, key)
        if name and rows and not any(name in row for row in rows):
            present = sorted({k for row in rows for k in row})
            raise SpaLoopError(
                f"prefalign.spa.prompts: {source.path} has no column {name!r} "
                f"({key}); its columns: {', '.join(present)}"
            )


def _row_gold(
    source: SpaPromptSource, row: dict, idx: int, gold_checker: str, checker: RowChecker
) -> tuple[str | None, list[str]]:
    from .gold import GoldError, check_options, resolve_gold

    options: list[str] = []
    try:
        if source.gold_options_field:
            field_name = source.gold_options_field
            options = check_options(row.get(field_name))
        field_name = source.gold_field
        return resolve_gold(row.get(field_name), options, gold_checker), options
    except GoldError as err:
        checker.bad(idx, field_name, str(err))
        return None, options


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def iteration_prompts(spa: SpaConfig, on_bad_row: str = "error") -> list:
    """The fresh prompts of iterations 1..N (element i−1 = iteration i), checked to
    be non-empty and disjoint across iterations."""
    n = spa.iterations
    sources, sizes = spa.prompts, spa.prompts_per_iteration
    if not sources:
        raise SpaLoopError(
            "prefalign.spa.prompts is empty: SPA iterations need fresh prompts "
            "(one source per iteration, or one source split by prompts_per_iteration)"
        )
    if sizes is not None and len(sizes) != n:
        raise SpaLoopError(
            f"prefalign.spa.prompts_per_iteration has {len(sizes)} sizes for "
            f"{n} iterations"
        )
    if sizes is not None and min(sizes) < 1:
        raise SpaLoopError("prefalign.spa.prompts_per_iteration: sizes must be >= 1")
    check = spa.gold_checker
    if len(sources) == n:
        parts = [load_prompts(s, on_bad_row, check) for s in sources]
        if sizes is not None:
            for i, (part, size) in enumerate(zip(parts, sizes, strict=True), 1):
                if len(part) < size:
                    raise SpaLoopError(
                        f"iteration {i}: {sources[i - 1].path} has {len(part)} usable "
                        f"prompts, prompts_per_iteration asks for {size}"
                    )
            parts = [p.select(range(s)) for p, s in zip(parts, sizes, strict=True)]
    elif len(sources) == 1:
        whole = load_prompts(sources[0], on_bad_row, check)
        if sizes is None:
            base, extra = divmod(len(whole), n)
            sizes = [base + (k < extra) for k in range(n)]
        if sum(sizes) > len(whole):
            raise SpaLoopError(
                f"too few prompts: {sources[0].path} has {len(whole)} usable prompts, "
                f"the {n} iterations need {sum(sizes)} ({sizes})"
            )
        starts = [sum(sizes[:k]) for k in range(n)]
        parts = [
            whole.select(range(a, a + s)) for a, s in zip(starts, sizes, strict=True)
        ]
    else:
        raise SpaLoopError(
            f"prefalign.spa.prompts has {len(sources)} sources for {n} iterations: "
            "give one per iteration, or one to split into disjoint parts"
        )
    seen: dict[str, int] = {}
    for i, part in enumerate(parts, 1):
        if len(part) == 0:
            raise SpaLoopError(f"iteration {i} has no prompts")
        for prompt in part["prompt"]:
            first = seen.setdefault(_norm(prompt), i)
            if first != i:
                raise SpaLoopError(
                    f"prompt {prompt[:60]!r} is in iterations {first} and {i}: SPA "
                    "needs fresh prompts each iteration (the parts overlap)"
                )
        repeated = len(part) - len({_norm(p) for p in part["prompt"]})
        if repeated:
            LOG.warning("SPA iteration %d: %d repeated prompt(s)", i, repeated)
    return parts


# -- models for the judge --------------------------------------------------------


def iter_dir(output_dir: str | Path, iteration: int) -> Path:
    """`output_dir/iter_<i>`."""
    return Path(output_dir) / f"iter_{iteration}"


def is_adapter_run(cfg: Any) -> bool:
    """True when the YAML trains a LoRA/QLoRA adapter."""
    return cfg.get("adapter") in ("lora", "qlora")


def original_base(cfg: Any) -> str:
    """π_init: the YAML's base model (the SFT model), resolved once."""
    from ..core.models import DEFAULT_MODEL_ALIAS, resolve_model_path

    base = cfg.get("base_model")
    if base == DEFAULT_MODEL_ALIAS:
        base = resolve_model_path(None)
    return absolute(base)


def absolute(path: str) -> str:
    p = Path(str(path)).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def has_weights(path: Path) -> bool:
    """True when `path` holds a saved model or adapter."""
    return any((path / name).exists() for name in WEIGHT_FILES)


@dataclass
class PolicySpec:
    """How to load π_{i−1} and π_init for judging (paths only, nothing loaded)."""

    base: str
    adapters: list[str] = field(default_factory=list)
    init_path: str | None = None  # None: π_init = the adapters disabled
    vllm_path: str | None = None

    @property
    def model_id(self) -> str:
        return self.base + "".join(f" + {a}" for a in self.adapters)

    @property
    def init_id(self) -> str:
        return self.init_path or "adapter-disabled"


def policy_spec(cfg: Any, iteration: int, model_path: str | None = None) -> PolicySpec:
    """Where π_{iteration−1} and π_init come from (the loop's layout, or --model)."""
    from ..core.config import prefalign_config

    spa = prefalign_config(cfg).spa
    base = original_base(cfg)
    init = absolute(spa.init_model) if spa.init_model else None
    if model_path:
        path = Path(model_path)
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.exists():
            on = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            on = absolute(on)
            if init is None and on != base:
                init = base
            return PolicySpec(on, [absolute(str(path))], init)
        return PolicySpec(absolute(str(path)), [], init or base, absolute(str(path)))
    out = Path(cfg.get("output_dir"))
    if is_adapter_run(cfg):
        dirs = [iter_dir(out, k) for k in range(iteration)]
        for d in dirs:
            if not (d / "adapter_config.json").exists():
                raise SpaLoopError(
                    f"π_{iteration - 1} not found: {d} holds no adapter; run the "
                    "earlier stages (axolotl prefalign spa) or pass --model"
                )
        merged = iter_dir(out, iteration - 1) / "merged"
        vllm = str(merged.resolve()) if has_weights(merged) else None
        return PolicySpec(base, [str(d.resolve()) for d in dirs], init, vllm)
    prev = iter_dir(out, iteration - 1)
    if not has_weights(prev):
        raise SpaLoopError(
            f"π_{iteration - 1} not found: {prev} holds no model; run the earlier "
            "stages (axolotl prefalign spa) or pass --model"
        )
    return PolicySpec(str(prev.resolve()), [], init or base, str(prev.resolve()))


def _load_causal_lm(path: str, cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.float32
    if cuda and cfg.get("bf16") in (True, "auto") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif cuda and cfg.get("fp16"):
        dtype = torch.float16
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": bool(cfg.get("trust_remote_code")),
    }
    # Same quantisation as training (QLoRA: NF4); on the CPU plain weights.
    if cuda and (cfg.get("load_in_4bit") or cfg.get("adapter") == "qlora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0}
    elif cuda and cfg.get("load_in_8bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to("cuda" if cuda else "cpu")
    return model.eval()


def load_policy(spec: PolicySpec, cfg: Any) -> tuple[Any, Any]:
    """(π_{i−1}, π_init or None when π_init = π_{i−1} with its adapters disabled)."""
    model = _load_causal_lm(spec.base, cfg)
    if spec.adapters:
        from peft import PeftModel

        names = [f"a{k}" for k in range(len(spec.adapters))]
        model = PeftModel.from_pretrained(
            model, spec.adapters[0], adapter_name=names[0]
        )
        for name, path in zip(names[1:], spec.adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
        if len(names) > 1:
            # All active at once: W_init + Σ_k ΔW_k = π_{i−1} (merges are additive).
            model.base_model.set_adapter(names, inference_mode=True)
        model.eval()
    init = _load_causal_lm(spec.init_path, cfg) if spec.init_path else None
    return model, init


def expand_iteration(
    cfg: Any,
    iteration: int,
    load_tokenizer: Callable[[], Any],
    model_path: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """The pairs of iteration I from π_{I−1} (the loop's layout, or `model_path`),
    written to `out_dir` (default `iter_<I>`); returns the expansion summary. `cfg`
    holds the keys an Axolotl YAML names them by (base_model, output_dir, adapter,
    bf16, load_in_4bit, prefalign)."""
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
    parts = iteration_prompts(spa, pa.on_bad_row)
    prompts = parts[iteration - 1]
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


# -- stages ----------------------------------------------------------------------


# What torchrun / accelerate give each process of a launch: a stage started from a
# loop that itself runs under one would join that launch's group (and wait for
# ranks that never come) instead of starting its own processes.
LAUNCH_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def stage_env() -> dict[str, str]:
    """The environment of a stage subprocess: the caller's (HF_HUB_OFFLINE
    included), no telemetry, and none of the launch variables of a multi-process
    launch the loop may itself run under."""
    env = {"AXOLOTL_DO_NOT_TRACK": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    if "RANK" in env or "LOCAL_RANK" in env:
        for key in [*LAUNCH_ENV, *(k for k in env if k.startswith("TORCHELASTIC_"))]:
            env.pop(key, None)
    return env


def run_command(cmd: list[str], log_path: Path) -> None:
    """Run one stage as a subprocess, teeing its output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    LOG.info("SPA: running %s (log: %s)", " ".join(cmd), log_path)
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    if proc.returncode:
        raise SpaLoopError(
            f"stage failed (exit {proc.returncode}): {' '.join(cmd)}; see {log_path}"
        )


class SpaState:
    """`spa_state.json`: which stages finished, with the settings they ran with."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf-8"))

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def finish(self, name: str, sha: str) -> None:
        self.data["stages"][name] = {
            "sha": sha,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(self.path, self.data)

    def forget(self, name: str) -> None:
        if self.data["stages"].pop(name, None) is not None:
            atomic_write_json(self.path, self.data)


def short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_key(settings: dict[str, Any], prompts) -> str:
    """The key of one expansion: its generation and judging settings and its own
    prompts (source row and text), as the split of this run picks them."""
    pairs = zip(prompts["index"], prompts["prompt"], strict=True)
    picked = [[int(i), p] for i, p in pairs]
    body = {"settings": settings, "prompts": picked}
    return short_sha(json.dumps(body, sort_keys=True))


@dataclass
class StageRunner:
    state: SpaState
    runner: Runner
    # True once a stage ran in this invocation: later stages' old outputs are stale.
    dirty: bool = False
    ran: list[str] = field(default_factory=list)

    def stage(
        self,
        name: str,
        sha: str,
        cmd: list[str],
        log: Path,
        done: Callable[[], bool],
        stale: list[Path],
    ) -> None:
        entry = self.state.entry(name)
        if entry and not log.exists():
            entry = None  # its folder was deleted (as a refusal advises): run anew
        if entry and not self.dirty:
            if entry["sha"] != sha:
                raise SpaLoopError(
                    f"stage {name} finished with other settings than the YAML has "
                    f"now; restore them, or delete {log.parent} and later iterations "
                    "to redo them"
                )
            if done():
                LOG.info("SPA: %s already done, skipped", name)
                return
            LOG.warning(
                "SPA: %s is recorded as done but its output is gone; rerun", name
            )
        if self.dirty:
            # An earlier stage was redone: anything this one left before is stale.
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.state.forget(name)
        self.dirty = True
        self.runner(cmd, log)
        if not done():
            raise SpaLoopError(f"stage {name} ended without its output; see {log}")
        self.state.finish(name, sha)
        self.ran.append(name)


def stage_prefalign(
    block: dict[str, Any] | None, iteration: int, flags_file: Path | None = None
) -> dict[str, Any]:
    """The `prefalign:` block of one stage's training config: the loss-side spa
    settings only (a change in the loop's own — prompts, sampling — must not stale
    finished trainings), the iteration, and the loss: plain DPO for the seed
    (iteration 0), SPA's after. `flags_file` (gold configured): where the SPA loss
    records each pair's noise flags."""
    pf = copy.deepcopy(block or {})
    spa_block = {k: v for k, v in (pf.get("spa") or {}).items() if k not in LOOP_ONLY}
    pf["spa"] = {**spa_block, "iteration": iteration}
    if flags_file is not None and iteration > 0:
        pf["spa"]["flags_file"] = str(flags_file)
    if iteration == 0:
        pf["loss"] = "sigmoid"
        pf.pop("label_smoothing", None)
    else:
        pf["loss"] = pf.get("loss") or "spa"
    return pf


def expansion_done(d: Path) -> bool:
    """True when `d` holds a complete expansion."""
    manifest = d / "pairs" / "manifest.json"
    if not (manifest.exists() and (d / "summary.json").exists()):
        return False
    return bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))


def pair_files(d: Path) -> list[str]:
    """The pair shard files an expansion's manifest lists (absolute paths)."""
    manifest = json.loads((d / "pairs" / "manifest.json").read_text(encoding="utf-8"))
    # Shards of blocks where every prompt was dropped are empty: nothing to load.
    return [
        str((d / "pairs" / s["file"]).resolve())
        for s in manifest["shards"]
        if s["rows"]
    ]


def training_stats(d: Path) -> dict[str, Any]:
    """Loss and reward statistics of a finished stage, from the trainer's log
    history (trainer_state.json here or in the newest checkpoint, else its log)."""
    history: list[dict] = []
    candidates = [d / "trainer_state.json"] + sorted(
        d.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        if path.exists():
            history = json.loads(path.read_text(encoding="utf-8")).get(
                "log_history", []
            )
            break
    if not history and (d / "train.log").exists():
        for line in (d / "train.log").read_text(encoding="utf-8").splitlines():
            line = line.strip().split("\r")[-1]
            if line.startswith("{") and "loss" in line:
                try:
                    entry = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(entry, dict):
                    history.append(entry)
    return history_stats(history)


def history_stats(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss, reward and SPA statistics of a trainer's log history: the last and
    the mean logged value of each, and the final train loss."""
    steps = [h for h in history if "loss" in h]
    final = [h for h in history if "train_loss" in h]
    stats: dict[str, Any] = {"logged_steps": len(steps)}
    if final:
        stats["train_loss"] = float(final[-1]["train_loss"])
    spa_keys = sorted({k for h in steps for k in h if k.startswith("spa/")})
    for key in ("loss", "rewards/accuracies", "rewards/margins", *spa_keys):
        values = [float(h[key]) for h in steps if key in h]
        if values:
            stats[f"last_{key}"] = values[-1]
            stats[f"mean_{key}"] = sum(values) / len(values)
    return stats


def flags_path(spa: SpaConfig, stage_dir: Path) -> Path | None:
    """Where an iteration's training records its noise flags (gold configured)."""
    from .gold import FLAGS_FILE

    return (Path(stage_dir) / FLAGS_FILE).resolve() if spa.has_gold else None


def write_gold_report(
    spa: SpaConfig, iteration: int, stage_dir: Path, prompts: Any
) -> dict[str, Any]:
    """`iter_<i>/gold_report.json`: iteration i's pairs against its prompts' gold,
    with the noise flags its training recorded; returns the report."""
    from ..core.shards import read_shards
    from .gold import (
        FLAG_KINDS,
        FLAGS_FILE,
        REPORT_FILE,
        flag_files,
        gold_report,
        read_flags,
    )

    d = Path(stage_dir)
    has_gold = "gold" in prompts.column_names
    rows = prompts.to_list() if has_gold else []
    flags_file = d / FLAGS_FILE
    report = gold_report(
        rows,
        read_shards(d / "pairs"),
        spa.gold_checker,
        read_flags(flags_file) or None,
        iteration,
    )
    report["flag_files"] = [str(f) for f in flag_files(flags_file)]
    if not has_gold:
        report["note"] = "this iteration's prompt source has no gold_field"
    atomic_write_json(d / REPORT_FILE, report)
    flags = report["noise_flags"]
    LOG.info(
        "SPA iteration %d gold (%s): %d pairs: %d exactly one right, %d both, %d "
        "neither, %d unknown; self-label accuracy %s on the exactly-one pairs; noise "
        "flags precision/recall with DND %s / %s, without %s / %s",
        iteration,
        spa.gold_checker,
        report["pairs"],
        report["exactly_one"],
        report["both"],
        report["neither"],
        report["unknown"],
        _fmt(report["self_labels"]["accuracy"], ".3f"),
        *(
            _fmt((flags.get(kind) or {}).get(key), ".3f")
            for kind in FLAG_KINDS
            for key in ("precision", "recall")
        ),
    )
    return report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The per-iteration statistics as a fixed-width text table."""
    head = (
        f"{'iter':>4} {'pairs':>6} {'ties':>5} {'empty':>5} {'|margin|':>9} "
        f"{'p_judge':>7} {'chosen':>7} {'reject':>7} {'loss':>7} {'acc':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        e, t = r.get("expansion") or {}, r.get("training") or {}
        lines.append(
            f"{r['iteration']:>4} {_fmt(e.get('pairs'), 'd'):>6} "
            f"{_fmt(e.get('ties_dropped'), 'd'):>5} "
            f"{_fmt(e.get('dropped_empty'), 'd'):>5} "
            f"{_fmt(e.get('mean_abs_margin'), '.4f'):>9} "
            f"{_fmt(e.get('mean_judge_prob'), '.3f'):>7} "
            f"{_fmt(e.get('chosen_mean_tokens'), '.1f'):>7} "
            f"{_fmt(e.get('rejected_mean_tokens'), '.1f'):>7} "
            f"{_fmt(t.get('train_loss', t.get('last_loss')), '.4f'):>7} "
            f"{_fmt(t.get('mean_rewards/accuracies'), '.3f'):>6}"
        )
    return "\n".join(lines)


CARD_HEADERS = (
    "iteration",
    "stage",
    "pairs",
    "ties dropped",
    "mean judge p(y_w ≻ y_l)",
    "noisy fraction",
    "τ (last)",
    "train loss",
    "reward accuracy",
)


# With gold answers (a prompt source's gold_field): the self-labels' accuracy and
# the noise flags' precision / recall on the pairs with exactly one right answer.
GOLD_HEADERS = (
    "gold: exactly-one pairs",
    "self-label accuracy",
    "flag precision / recall (DND)",
    "flag precision / recall (no DND)",
)


def _pr(precision: float | None, recall: float | None) -> str | None:
    if precision is None and recall is None:
        return None
    return f"{_fmt(precision, '.3f')} / {_fmt(recall, '.3f')}"


def card_table(rows: list[dict[str, Any]]) -> str:
    """The per-iteration statistics as a markdown table (for the model card):
    expansion pairs, ties, the judge's mean preference probability, the fraction
    of pairs below the confidence threshold τ (mean over logged steps) and τ; with
    gold answers also the gold report's summary (`spa.gold`)."""
    from ..core.model_card import markdown_table

    gold = any(r.get("gold") for r in rows)
    table = []
    for r in rows:
        e, t = r.get("expansion") or {}, r.get("training") or {}
        row = [
            r["iteration"],
            r.get("stage") or ("seed DPO" if r["iteration"] == 0 else "SPA"),
            e.get("pairs"),
            e.get("ties_dropped"),
            e.get("mean_judge_prob"),
            t.get("mean_spa/noisy_fraction"),
            t.get("last_spa/threshold"),
            t.get("train_loss", t.get("last_loss")),
            t.get("mean_rewards/accuracies"),
        ]
        if gold:
            g = r.get("gold") or {}
            row += [
                g.get("exactly_one"),
                g.get("self_label_accuracy"),
                _pr(g.get("flag_precision_dnd"), g.get("flag_recall_dnd")),
                _pr(g.get("flag_precision_plain"), g.get("flag_recall_plain")),
            ]
        table.append(row)
    headers = CARD_HEADERS + (GOLD_HEADERS if gold else ())
    return markdown_table(headers, table)


def gold_table(rows: list[dict[str, Any]]) -> str:
    """The gold reports' summaries as a fixed-width text table."""
    head = (
        f"{'iter':>4} {'pairs':>6} {'one':>5} {'unkn':>5} {'label_acc':>9} "
        f"{'P(dnd)':>7} {'R(dnd)':>7} {'P(plain)':>8} {'R(plain)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r.get("gold")
        if not g:
            continue
        lines.append(
            f"{r['iteration']:>4} {_fmt(g.get('pairs'), 'd'):>6} "
            f"{_fmt(g.get('exactly_one'), 'd'):>5} {_fmt(g.get('unknown'), 'd'):>5} "
            f"{_fmt(g.get('self_label_accuracy'), '.3f'):>9} "
            f"{_fmt(g.get('flag_precision_dnd'), '.3f'):>7} "
            f"{_fmt(g.get('flag_recall_dnd'), '.3f'):>7} "
            f"{_fmt(g.get('flag_precision_plain'), '.3f'):>8} "
            f"{_fmt(g.get('flag_recall_plain'), '.3f'):>8}"
        )
    return "\n".join(lines)


def finished_rows(out: Path, before: int) -> list[dict[str, Any]]:
    """The metrics.json of iterations 0..before−1 that exist (for a stage's card)."""
    rows = []
    for i in range(before):
        path = iter_dir(out, i) / "metrics.json"
        if path.exists():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


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
    settings = spa.model_dump(include=EXPAND_SETTINGS - SPLIT_SETTINGS)
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
