"""The SPA loop with Axolotl as the trainer: `axolotl prefalign spa CONFIG`.

Seed DPO, then N rounds of expand → train (docs/methods.md#spa); the stages run as
subprocesses (`axolotl train`, `axolotl merge-lora`, `axolotl prefalign
spa-expand`), and the layout, resumable state and statistics come from `spa.loop`.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.config import SpaConfig, prefalign_config
from ...core.shards import atomic_write_text, main_process_only
from ...core.text_files import read_text
from ...spa.loop import (
    Runner,
    SpaLoopError,
    absolute,
    expand_iteration,
    flags_path,
    is_adapter_run,
    iteration_prompts,
    original_base,
    run_stages,
    stage_prefalign,
)

LOG = logging.getLogger("axolotl_prefalign")

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
    return expand_iteration(cfg, iteration, tokenizer_loader(cfg), model_path, out_dir)


def tokenizer_loader(cfg: Any) -> Callable[[], Any]:
    """Axolotl's tokenizer of the YAML, loaded when called."""

    def load() -> Any:
        from axolotl.loaders import load_tokenizer

        return load_tokenizer(cfg)

    return load


def premise_from_config(
    cfg: Any, samples: int, model_path: str | None = None, config: str = "CONFIG"
) -> dict[str, Any]:
    """`axolotl prefalign spa-premise CONFIG`: the judge's accuracy against gold on
    `samples` prompts, nothing trained (`spa.premise`)."""
    from ...spa.premise import check_premise

    return check_premise(cfg, samples, tokenizer_loader(cfg), model_path, config)


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
    if iteration == 0:
        # Seed DPO is plain DPO on the labelled seed, for seed_epochs.
        c["num_epochs"] = spa.seed_epochs
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
    # With gold answers the SPA loss records each pair's noise flags (by pair id,
    # which type: axolotl_prefalign.spa_pairs carries) for the gold report.
    c["prefalign"] = stage_prefalign(
        raw.get("prefalign"), iteration, flags_path(spa, out)
    )
    if c.get("rl_beta") is None and not (c.get("trl") or {}).get("beta"):
        c["rl_beta"] = spa.beta
    ds = c.get("deepspeed")
    if isinstance(ds, str) and os.path.isfile(ds):
        # Axolotl opens the path from the working directory; the stage's YAML
        # lives in iter_<i>/ and may be rerun from elsewhere.
        c["deepspeed"] = os.path.abspath(ds)
    return c


def check_stage_launch(raw: dict[str, Any], spa: SpaConfig) -> None:
    """Say when the YAML shards the model but the stages start one process."""
    sharded = [k for k in ("deepspeed", "fsdp_config", "fsdp") if raw.get(k)]
    if sharded and spa.launcher == "python":
        LOG.warning(
            "SPA: %s reach every train stage, but prefalign.spa.launcher: python "
            "starts one process per stage; set prefalign.spa.launcher: accelerate "
            "(or torchrun) to train on all GPUs",
            " and ".join(sharded),
        )


def run_from_config(
    cfg: Any, config_path: str | Path, runner: Runner | None = None
) -> dict[str, Any]:
    """`axolotl prefalign spa CONFIG`: seed DPO, then expand → train per iteration;
    resumable at stage granularity. Returns the summary (also `spa_summary.json`)."""
    import yaml

    if not main_process_only("the SPA loop"):
        return {}
    config_path = Path(config_path).resolve()
    raw = yaml.safe_load(read_text(config_path)) or {}
    if PLUGIN not in (raw.get("plugins") or []):
        raise SpaLoopError(f"the SPA loop needs `plugins: [{PLUGIN}]` in {config_path}")
    if raw.get("rl") not in (None, "dpo"):
        raise SpaLoopError(f"SPA trains with rl: dpo, the YAML has rl: {raw['rl']}")
    pa = prefalign_config(cfg)
    spa = pa.spa
    iteration_prompts(spa, pa.on_bad_row)  # bad prompt settings fail before training
    check_stage_launch(raw, spa)
    out = Path(cfg.get("output_dir")).resolve()
    base = original_base(cfg)
    tok = cfg.get("tokenizer_config")
    tokenizer = base if tok in (None, raw.get("base_model")) else absolute(tok)
    trainings = AxolotlTrainings(
        raw, spa, config_path, base, tokenizer, is_adapter_run(cfg)
    )
    summary = run_stages(spa, out, trainings, runner, pa.on_bad_row)
    _final_card(cfg, config_path, summary)
    return summary


def _final_card(cfg: Any, config_path: Path, summary: dict[str, Any]) -> None:
    # The final model is written by merge-lora (or is the last stage's output):
    # its card holds the per-iteration table and the loop's YAML as written.
    from .model_card import write_spa_card

    try:
        path = write_spa_card(cfg, read_text(config_path), summary)
    except Exception:  # noqa: BLE001 - a card must never fail a finished loop
        LOG.warning("SPA: could not write the final model card", exc_info=True)
        return
    LOG.info("SPA: model card of the final model: %s", path)


@dataclass
class AxolotlTrainings:
    """The SPA loop's stages as Axolotl commands (`spa.loop.Trainings`)."""

    raw: dict[str, Any]
    spa: SpaConfig
    config_path: Path
    base: str
    tokenizer: str
    adapter: bool

    def expand_command(self, iteration: int, out: Path) -> list[str]:
        return expand_command(self.config_path, iteration, out)

    def write_train_config(self, iteration, base_model, out, pairs):
        import yaml

        conf = stage_config(
            self.raw,
            self.spa,
            iteration,
            base_model=base_model,
            tokenizer=self.tokenizer,
            out=out,
            pairs=pairs,
        )
        text = yaml.safe_dump(conf, sort_keys=False, allow_unicode=True)
        atomic_write_text(out / "config.yml", text)
        return out / "config.yml", text

    def train_command(self, config: Path) -> list[str]:
        return train_command(config, self.spa.launcher)

    def merge_command(self, config: Path) -> list[str]:
        return merge_command(config)
