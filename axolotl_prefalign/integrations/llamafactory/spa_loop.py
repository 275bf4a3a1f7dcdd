"""The SPA loop with LLaMA-Factory as the trainer: `prefalign llamafactory spa CONFIG`.

CONFIG is a LLaMA-Factory DPO YAML (its `dataset:` is the labelled seed, a
`ranking: true` set) plus a `prefalign:` block with `loss: spa` and the `spa:`
settings an Axolotl SPA YAML has (prompts, iterations, sampling, DND). The layout,
the resumable stages and the statistics are `spa.loop`'s, as with Axolotl; each
stage is a subprocess:

    iter_0/          seed DPO (sigmoid) through `prefalign llamafactory train`
    iter_<i>/        expansion (`... spa_loop expand`, our sampling and judge),
                     lf_data/ (the judged pairs as a `prefalign_pairs` dataset with
                     its dataset_info.json), config.yaml, the trained adapter
    iter_<i>/merged  LoRA: π_i as one model (`llamafactory-cli export`)

Iteration i trains a fresh adapter on π_{i−1} = `iter_<i-1>/merged` with
`prefalign.loss: spa` and `prefalign.spa.iteration: i`: LLaMA-Factory's reference
is the adapter disabled, i.e. π_{i−1}, as SPA asks.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.config import PrefAlignConfig, PrefAlignConfigError, SpaConfig
from ...core.shards import atomic_write_json, atomic_write_text, main_process_only
from ...spa.loop import (
    Runner,
    expand_iteration,
    iteration_prompts,
    original_base,
    run_stages,
    stage_prefalign,
)
from .launcher import MODULE as LAUNCHER
from .launcher import PAIRS_FORMATTING, log_to_stderr, read_config, read_raw

MODULE = "axolotl_prefalign.integrations.llamafactory.spa_loop"


def loop_view(args: dict[str, Any], pa: PrefAlignConfig) -> dict[str, Any]:
    """A LLaMA-Factory config under the keys `spa.loop` reads (Axolotl's names)."""
    quant = args.get("quantization_bit")
    return {
        "base_model": args.get("model_name_or_path"),
        "output_dir": args.get("output_dir"),
        "adapter": "lora" if args.get("finetuning_type", "lora") == "lora" else None,
        "bf16": args.get("bf16"),
        "fp16": args.get("fp16"),
        "load_in_4bit": quant == 4,
        "load_in_8bit": quant == 8,
        "trust_remote_code": args.get("trust_remote_code"),
        "prefalign": pa.model_dump(),
    }


def _check(args: dict[str, Any], pa: PrefAlignConfig, path: Path) -> None:
    if args.get("stage") != "dpo":
        raise PrefAlignConfigError(
            f"the SPA loop trains with stage: dpo, {path} has {args.get('stage')!r}"
        )
    if pa.loss not in (None, "spa"):
        raise PrefAlignConfigError(
            f"the SPA loop trains iterations with prefalign.loss: spa, got {pa.loss}"
        )
    for key in ("model_name_or_path", "output_dir", "dataset", "template"):
        if not args.get(key):
            raise PrefAlignConfigError(f"the SPA loop needs `{key}:` in {path}")


@dataclass
class LlamaFactoryTrainings:
    """The SPA loop's stages as LLaMA-Factory runs (`spa.loop.Trainings`)."""

    args: dict[str, Any]
    block: dict[str, Any]
    spa: SpaConfig
    config_path: Path
    base: str
    adapter: bool

    def expand_command(self, iteration: int, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            MODULE,
            "expand",
            str(self.config_path),
            str(iteration),
            str(out),
        ]

    def write_train_config(self, iteration, base_model, out, pairs):
        import yaml

        c = copy.deepcopy(self.args)
        for key in ("adapter_name_or_path", "resume_from_checkpoint", "eval_dataset"):
            c.pop(key, None)
        c.update(
            model_name_or_path=base_model,
            stage="dpo",
            do_train=True,
            output_dir=str(out),
            overwrite_output_dir=True,
        )
        c.setdefault("pref_beta", self.spa.beta)
        if iteration == 0:
            # Seed DPO is plain DPO on the labelled seed, for seed_epochs.
            c["num_train_epochs"] = float(self.spa.seed_epochs)
        else:
            c["num_train_epochs"] = 1.0
            c["dataset"] = f"prefalign_spa_iter{iteration}"
            c["dataset_dir"] = str(write_pairs_dataset(out, iteration, pairs or []))
        c["prefalign"] = stage_prefalign(self.block, iteration)
        text = yaml.safe_dump(c, sort_keys=False, allow_unicode=True)
        atomic_write_text(out / "config.yaml", text)
        return out / "config.yaml", text

    def train_command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", LAUNCHER, str(config)]

    def merge_command(self, config: Path) -> list[str]:
        """`llamafactory-cli export` of the stage's adapter into `merged/`."""
        import yaml

        c = yaml.safe_load(config.read_text(encoding="utf-8"))
        out = Path(c["output_dir"])
        merge = {
            "model_name_or_path": c["model_name_or_path"],
            "adapter_name_or_path": str(out),
            "template": c["template"],
            "finetuning_type": "lora",
            "export_dir": str(out / "merged"),
            "trust_remote_code": bool(c.get("trust_remote_code")),
        }
        path = out / "merge.yaml"
        atomic_write_text(path, yaml.safe_dump(merge, sort_keys=False))
        cli = Path(sys.executable).with_name("llamafactory-cli")
        head = (
            [str(cli)] if cli.exists() else [sys.executable, "-m", "llamafactory.cli"]
        )
        return [*head, "export", str(path)]


def write_pairs_dataset(out: Path, iteration: int, pair_files: list[str]) -> Path:
    """The expansion's pair shards as one `prefalign_pairs` dataset for
    LLaMA-Factory: `out/lf_data/{pairs.jsonl, dataset_info.json}`."""
    data = out / "lf_data"
    rows = "".join(Path(f).read_text(encoding="utf-8") for f in pair_files)
    atomic_write_text(data / "pairs.jsonl", rows)
    info = {
        f"prefalign_spa_iter{iteration}": {
            "file_name": "pairs.jsonl",
            "formatting": PAIRS_FORMATTING,
            "ranking": True,
        }
    }
    atomic_write_json(data / "dataset_info.json", info)
    return data


def run(config_path: str | Path, runner: Runner | None = None) -> dict[str, Any]:
    """`prefalign llamafactory spa CONFIG`: seed DPO, then expand → train per
    iteration with LLaMA-Factory; resumable. Returns the summary."""
    if not main_process_only("the SPA loop"):
        return {}
    config_path = Path(config_path).resolve()
    args, pa = read_config(config_path)
    _check(args, pa, config_path)
    view = loop_view(args, pa)
    iteration_prompts(pa.spa, pa.on_bad_row)  # bad prompt settings fail first
    block = read_raw(config_path).get("prefalign")  # as written, for the stages
    trainings = LlamaFactoryTrainings(
        args,
        block or {},
        pa.spa,
        config_path,
        original_base(view),
        view["adapter"] is not None,
    )
    out = Path(args["output_dir"]).resolve()
    # Gold reports carry the self-label accuracy only: LLaMA-Factory's batches
    # have no pair id, so its SPA loss records no noise flags (no flags_file).
    return run_stages(pa.spa, out, trainings, runner, pa.on_bad_row)


def expand(config_path: str | Path, iteration: int, out_dir: str) -> dict[str, Any]:
    """One iteration's expansion for a LLaMA-Factory SPA config (a loop stage)."""
    args, pa = read_config(config_path)
    view = loop_view(args, pa)

    def tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            original_base(view), trust_remote_code=bool(view["trust_remote_code"])
        )

    return expand_iteration(view, iteration, tokenizer, None, out_dir)


def main() -> None:
    """`python -m axolotl_prefalign.integrations.llamafactory.spa_loop expand ...`."""
    if len(sys.argv) != 5 or sys.argv[1] != "expand":
        raise SystemExit(f"usage: python -m {MODULE} expand CONFIG ITERATION OUT")
    log_to_stderr()
    expand(sys.argv[2], int(sys.argv[3]), sys.argv[4])


if __name__ == "__main__":
    main()
