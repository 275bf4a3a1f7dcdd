"""The model card of every run the plugin shapes: DPO through our trainer,
contrast SFT, RobustFT SFT, each SPA stage and the final SPA model.

Axolotl ends `train` with `trainer.create_model_card(...)` (a hub push calls it
too). Left alone, TRL's DPO card names no base model when it is a local folder
("a fine-tuned version of [None]"), drops Axolotl's tags and config, and no card
holds the method's results. Our trainers override `create_model_card`
(`CardMixin`); a run on Axolotl's own trainer (contrast SFT without unlikelihood,
RobustFT) gets the same card through the plugin's `post_trainer_create`
(`attach_card`). The card IS the README.md the trainer writes; nothing is written
beside it. The final SPA model (written by `axolotl merge-lora`, not a trainer)
gets its card from the loop (`write_spa_card`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ...contrast.format import TYPE_NAME as CONTRAST_TYPE
from ...contrast.format import count_rows
from ...core.config import PrefAlignConfig, prefalign_config
from ...core.local_data import read_entry
from ...core.model_card import (
    CITATIONS,
    CardSpec,
    base_model_id,
    dataset_type_label,
    framework_versions,
    markdown_table,
    metrics_table,
    portable_yaml,
    write_card,
)
from ...robustft.pipeline import DATASET_TYPE as ROBUSTFT_TYPE
from ...robustft.pipeline import find_report, report_markdown
from ...spa.loop import card_table, finished_rows, history_stats

LOG = logging.getLogger("axolotl_prefalign")

DPO, SPA, CONTRAST, ROBUSTFT = "dpo", "spa", "contrast-sft", "robustft"
VERSIONS = (
    "axolotl",
    "axolotl-prefalign",
    "trl",
    "transformers",
    "peft",
    "torch",
    "datasets",
    "tokenizers",
)
LOSS_PAPERS = {
    "sigmoid": "DPO (Rafailov et al. 2023)",
    "cdpo": "conservative DPO (Mitchell 2023)",
    "robust": "robust DPO (Chowdhury et al. 2024)",
    "ipo": "IPO (Azar et al. 2023)",
    "hinge": "SLiC hinge (Zhao et al. 2023)",
    "soft": "soft labels from SPA's judge",
    "spa": "SPA self-refinement with de-coupled noise detection (Kim et al. 2025)",
}


# -- what shaped the run ---------------------------------------------------------


def _raw_yaml(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    """(the YAML as written, parsed) from the file Axolotl read the config from."""
    import yaml

    path = cfg.get("axolotl_config_path")
    if not path or not Path(str(path)).is_file():
        return None, {}
    text = Path(str(path)).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return text, data if isinstance(data, dict) else {}


def spa_iteration(cfg: Any, raw: dict[str, Any]) -> int | None:
    """The SPA stage a run trains (its YAML sets prefalign.spa.iteration, as the
    loop's stage configs do), or None for a run outside the loop."""
    block = (raw.get("prefalign") or {}).get("spa") or {}
    if "iteration" in block:
        return int(block["iteration"])
    match = re.fullmatch(r"iter_(\d+)", Path(str(cfg.get("output_dir") or "")).name)
    if match and prefalign_config(cfg).loss == "spa":
        return int(match[1])
    return None


def run_methods(cfg: Any, raw: dict[str, Any] | None = None) -> list[str]:
    """The plugin's methods that shaped this run (empty: a run it left alone)."""
    raw = _raw_yaml(cfg)[1] if raw is None else raw
    pa = prefalign_config(cfg)
    methods = []
    if pa.trainer_active:
        is_spa = pa.loss == "spa" or spa_iteration(cfg, raw) is not None
        methods.append(SPA if is_spa else DPO)
    # A list, not a set: a dict `type:` (user-defined) is not hashable.
    types = [d.get("type") for d in cfg.get("datasets") or []]
    if CONTRAST_TYPE in types:
        methods.append(CONTRAST)
    if ROBUSTFT_TYPE in types:
        methods.append(ROBUSTFT)
    return methods


# -- the pieces of a card ----------------------------------------------------------


def _tags(methods: list[str], cfg: Any, extra: Any) -> list[str]:
    tags = ["axolotl", "prefalign", *methods]
    if SPA in methods or DPO in methods:
        tags += ["dpo", "trl"]
    if CONTRAST in methods or ROBUSTFT in methods:
        tags.append("sft")
    if cfg.get("adapter") in ("lora", "qlora"):
        tags.append("lora")
    if isinstance(extra, str):
        extra = [extra]
    tags += [t for t in extra or [] if t]
    tags.append("generated_from_trainer")
    return list(dict.fromkeys(tags))


def _dataset_names(entries: list[Any]) -> list[str]:
    return [str(d.get("path")) for d in entries if d.get("path")]


def _datasets_table(entries: list[Any]) -> str:
    """Each dataset the run read: its path, `type:` and split."""
    rows = [
        (
            f"`{d.get('path')}`",
            f"`{dataset_type_label(d.get('type'))}`",
            d.get("split") or "train",
        )
        for d in entries
    ]
    return markdown_table(["dataset", "type", "split"], rows)


def _settings(cfg: Any, pa: PrefAlignConfig, methods: list[str]) -> str:
    rows: list[tuple[str, Any]] = []
    if pa.trainer_active:
        rows.append(
            ("loss", f"`{pa.loss or 'sigmoid'}`: {LOSS_PAPERS[pa.loss or 'sigmoid']}")
        )
        beta = cfg.get("rl_beta") or (cfg.get("trl") or {}).get("beta")
        rows.append(("β", beta))
    if SPA in methods:
        spa = pa.spa
        rows += [
            ("SPA noise quantile K / α", f"{spa.noise_quantile} / {spa.alpha}"),
            ("de-coupled noise detection", f"{spa.dnd} (λ {spa.dnd_lambdas})"),
        ]
    if CONTRAST in methods:
        c = pa.contrast
        rows += [
            ("contrast preset / mode", f"{c.preset} / {c.mode}"),
            ("positive-only ratio", c.positive_only_ratio),
            ("unlikelihood weight", c.unlikelihood_weight),
        ]
    if ROBUSTFT in methods:
        r = pa.robustft
        rows += [
            ("RobustFT agreement / reasoning", f"{r.agreement} / {r.reasoning}"),
            (
                "RobustFT k / review / select ratio",
                f"{r.k} / {r.review} / {r.select_ratio}",
            ),
        ]
    adapter = cfg.get("adapter")
    if adapter:
        rows.append(
            ("adapter", f"{adapter} (r={cfg.get('lora_r')}, α={cfg.get('lora_alpha')})")
        )
    for key in (
        "learning_rate",
        "lr_scheduler",
        "max_steps",
        "num_epochs",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "sequence_len",
        "optimizer",
        "seed",
    ):
        if cfg.get(key) is not None:
            rows.append((key, cfg.get(key)))
    return markdown_table(["setting", "value"], rows)


def _history_metrics(state: Any) -> dict[str, Any]:
    history = list(getattr(state, "log_history", None) or [])
    stats = history_stats(history)
    out: dict[str, Any] = {"steps": getattr(state, "global_step", None)}
    for key in (
        "train_loss",
        "last_loss",
        "last_rewards/accuracies",
        "last_rewards/margins",
    ):
        if key in stats:
            out[key] = stats[key]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return out


def _contrast_results(cfg: Any, pa: PrefAlignConfig, trainer: Any) -> str:
    rows = []
    for entry in cfg.get("datasets") or []:
        if entry.get("type") != CONTRAST_TYPE:
            continue
        try:
            counts = count_rows(read_entry(entry, pa.on_bad_row).rows, pa.contrast)
        except ValueError:  # not local data: counted in the training log only
            continue
        rows.append(
            (
                entry.get("path"),
                counts["rows"],
                counts["bad_rows"],
                counts["contrast_rows"],
                counts["positive_only_rows"],
            )
        )
    text = markdown_table(
        [
            "contrast dataset",
            "rows",
            "bad rows",
            "with the negative answer",
            "positive-only",
        ],
        rows,
    )
    trained = getattr(trainer, "train_dataset", None)
    if trained is not None and hasattr(trained, "__len__"):
        text += f"\n\nTraining rows after Axolotl's own filtering: {len(trained)}."
    return text


def _robustft_results(cfg: Any) -> str:
    parts = []
    for entry in cfg.get("datasets") or []:
        if entry.get("type") != ROBUSTFT_TYPE:
            continue
        report = find_report(cfg, entry)
        if report is None:
            parts.append(f"`{entry.get('path')}`: no RobustFT report found.")
        else:
            parts.append(report_markdown(report))
    return "\n\n".join(parts)


def _spa_stage_results(cfg: Any, trainer: Any, iteration: int) -> str:
    import json

    out = Path(str(cfg.get("output_dir")))
    rows = finished_rows(out.parent, iteration)
    summary = out / "summary.json"
    expansion = (
        json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else None
    )
    history = list(getattr(trainer.state, "log_history", None) or [])
    rows.append(
        {
            "iteration": iteration,
            "stage": "seed DPO" if iteration == 0 else "SPA",
            "expansion": expansion,
            "training": history_stats(history),
        }
    )
    return (
        f"This is stage `iter_{iteration}` of an SPA loop "
        f"(`{out.parent}`); the iterations so far:\n\n" + card_table(rows)
    )


def _citations(methods: list[str], pa: PrefAlignConfig) -> list:
    keys: list[str] = []
    if SPA in methods:
        keys += ["spa", "dpo"]
    if DPO in methods:
        keys.append("dpo")
    if CONTRAST in methods:
        keys += ["chain_of_hindsight", "lema"]
        if pa.contrast.unlikelihood_weight > 0:
            keys.append("cut")
    if ROBUSTFT in methods:
        keys.append("robustft")
    return [CITATIONS[k] for k in dict.fromkeys(keys)]


def _method_phrase(methods: list[str], pa: PrefAlignConfig) -> str:
    phrases = {
        DPO: f"DPO-family preference training (`prefalign.loss: {pa.loss or 'sigmoid'}`"
        ") through prefalign's fused log-prob trainer",
        SPA: "SPA (Spread Preference Annotation) preference training",
        CONTRAST: "plaintext contrast SFT (the rejected answer shown as a bad "
        "example, loss on the chosen answer only)",
        ROBUSTFT: "RobustFT (SFT on the denoised set: detected noisy answers "
        "relabelled, the most confident kept)",
    }
    return " and ".join(phrases[m] for m in methods)


def build_spec(
    cfg: Any, trainer: Any = None, *, extra_tags: Any = None
) -> CardSpec | None:
    """The card of a finished (or checkpointed) run, or None for a run the plugin
    did not shape."""
    text, raw = _raw_yaml(cfg)
    methods = run_methods(cfg, raw)
    if not methods:
        return None
    pa = prefalign_config(cfg)
    out = Path(str(cfg.get("output_dir") or "."))
    iteration = spa_iteration(cfg, raw) if SPA in methods else None
    hub = cfg.get("hub_model_id")
    if hub:
        name = str(hub).split("/")[-1]
    elif iteration is not None:
        name = f"{out.parent.name}-{out.name}"
    else:
        name = out.name
    source = raw.get("base_model") or cfg.get("base_model")
    entries = list(raw.get("datasets") or cfg.get("datasets") or [])
    results: list[tuple[str, str]] = []
    if trainer is not None:
        results.append(
            ("Training results", metrics_table(_history_metrics(trainer.state)))
        )
    if iteration is not None and trainer is not None:
        results.append(("SPA iterations", _spa_stage_results(cfg, trainer, iteration)))
    if CONTRAST in methods:
        results.append(("Contrast data", _contrast_results(cfg, pa, trainer)))
    if ROBUSTFT in methods:
        results.append(("RobustFT denoising", _robustft_results(cfg)))
    versions = framework_versions(VERSIONS)
    return CardSpec(
        model_name=name,
        method=_method_phrase(methods, pa),
        tags=_tags(methods, cfg, extra_tags),
        base_model=base_model_id(source) or base_model_id(cfg.get("base_model")),
        base_model_source=str(source) if source else None,
        datasets=_dataset_names(entries),
        adapter=cfg.get("adapter") in ("lora", "qlora"),
        model_id=hub or raw.get("output_dir") or cfg.get("output_dir"),
        procedure=_datasets_table(entries) + "\n\n" + _settings(cfg, pa, methods),
        results=results,
        citations=_citations(methods, pa),
        config_yaml=portable_yaml(text) if text else None,
        axolotl_version=versions.get("axolotl"),
        versions=versions,
    )


# -- the trainer hook ------------------------------------------------------------------


def _axolotl_cfg(trainer: Any) -> Any:
    cfg = getattr(trainer, "axolotl_cfg", None)
    if cfg is None:
        from axolotl.integrations.base import PluginManager

        cfg = PluginManager.get_instance().cfg
    return cfg


def write_run_card(trainer: Any, cfg: Any, tags: Any = None) -> bool:
    """Write the run's card as output_dir/README.md; False when the plugin did not
    shape the run or the card failed (the trainer's own card is then written)."""
    if cfg is None:
        return False
    try:
        spec = build_spec(cfg, trainer, extra_tags=tags)
        if spec is None:
            return False
        write_card(spec, trainer.args.output_dir)
    except Exception:  # noqa: BLE001 - a card must never fail a finished run
        LOG.warning("prefalign: could not write the model card", exc_info=True)
        return False
    return True


class CardMixin:
    """`create_model_card` for the plugin's trainers (Axolotl and TRL call it at
    the end of training, on checkpoints and on hub pushes)."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if not self.is_world_process_zero():
            return
        if not write_run_card(self, _axolotl_cfg(self), kwargs.get("tags")):
            super().create_model_card(*args, **kwargs)


def attach_card(trainer: Any, cfg: Any) -> None:
    """Give a trainer that is not ours (Axolotl's SFT trainer for the contrast and
    RobustFT dataset types) the run's card in place of its own."""
    if isinstance(trainer, CardMixin) or not run_methods(cfg):
        return
    own = trainer.create_model_card

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        if not trainer.is_world_process_zero():
            return
        if not write_run_card(trainer, cfg, kwargs.get("tags")):
            own(*args, **kwargs)

    trainer.create_model_card = create_model_card


# -- the final SPA model -------------------------------------------------------------


def write_spa_card(cfg: Any, raw_text: str, summary: dict[str, Any]) -> Path | None:
    """The card of the SPA loop's final model (iter_N/merged, or iter_N), with the
    per-iteration table and the loop's YAML as written."""
    import yaml

    raw = yaml.safe_load(raw_text) or {}
    final = Path(summary["final_model"])
    pa = prefalign_config(cfg)
    spa = pa.spa
    source = raw.get("base_model") or cfg.get("base_model")
    seed = _dataset_names(raw.get("datasets") or [])
    prompts = [str(p.path) for p in spa.prompts]
    settings = markdown_table(
        ["setting", "value"],
        [
            ("iterations", spa.iterations),
            ("seed DPO epochs", spa.seed_epochs),
            ("β", spa.beta),
            ("responses per prompt", spa.num_samples),
            ("noise quantile K / α", f"{spa.noise_quantile} / {spa.alpha}"),
            ("de-coupled noise detection", f"{spa.dnd} (λ {spa.dnd_lambdas})"),
            ("adapter", cfg.get("adapter") or "none (full fine-tuning)"),
        ],
    )
    versions = framework_versions(VERSIONS)
    spec = CardSpec(
        model_name=Path(str(cfg.get("output_dir"))).name,
        method=(
            "SPA (Spread Preference Annotation): seed DPO on the labelled pairs, "
            f"then {spa.iterations} rounds of sampling, judging by the model's own "
            "implicit reward and self-refined preference training"
        ),
        tags=_tags([SPA], {"adapter": None}, None),
        base_model=base_model_id(source) or base_model_id(cfg.get("base_model")),
        base_model_source=str(source) if source else None,
        datasets=list(dict.fromkeys(seed + prompts)),
        adapter=False,
        model_id=str(final),
        procedure=settings,
        results=[
            (
                "SPA iterations",
                "Per iteration: the expansion's pairs and ties, the judge's mean "
                "preference probability, the fraction of pairs below the "
                "confidence threshold τ (noisy) and τ.\n\n"
                + card_table(summary["iterations"]),
            )
        ],
        citations=[CITATIONS["spa"], CITATIONS["dpo"]],
        config_yaml=portable_yaml(raw_text),
        axolotl_version=versions.get("axolotl"),
        versions=versions,
    )
    return write_card(spec, final)
