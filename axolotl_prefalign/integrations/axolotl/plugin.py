"""The Axolotl plugin: `plugins: [axolotl_prefalign.PrefAlignPlugin]`."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from axolotl.integrations.base import BasePlugin

from ...core.config import PrefAlignConfigError, prefalign_config
from ...core.models import DEFAULT_MODEL_ALIAS
from .dataset_check import precheck_datasets
from .scale_out import check_scale_out

LOG = logging.getLogger("axolotl_prefalign")

TRAINER_CLS = "axolotl_prefalign.trainers.PrefAlignDPOTrainer"
SFT_TRAINER_CLS = "axolotl_prefalign.trainers.ContrastSFTTrainer"


def _stop_axolotl_telemetry() -> None:
    """Turn Axolotl's telemetry off from here on, unless the user set it.

    Axolotl decides when `axolotl` starts (its TelemetryManager, made at import of
    `axolotl.cli.config`) and sends `config-loaded` before any plugin loads, so the
    variable alone, set now, would change nothing: the manager is told directly.
    """
    if "AXOLOTL_DO_NOT_TRACK" in os.environ:
        return  # the user's own choice, either way
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
    from axolotl.telemetry.manager import TelemetryManager

    TelemetryManager.get_instance().enabled = False  # no events, no error reports


def _use_axolotl_logging() -> None:
    # Axolotl configures handlers for its own "axolotl" logger only; ours would
    # fall through to the root logger (WARNING) and hide INFO progress messages.
    ours, theirs = LOG, logging.getLogger("axolotl")
    if theirs.handlers and not ours.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level)
        ours.propagate = False


def _salt_dataset_hash() -> None:
    # Axolotl's prepared-dataset hash ignores plugin settings; our formats depend on
    # `prefalign:` (template, masking, denoising), so a changed setting must not
    # reuse a stale cache. The hash reads this module global at call time.
    from axolotl.utils.data import shared

    # The format revision covers changes to our formatting code itself.
    salt = ("prefalign", "prefalign_data_revision")
    missing = tuple(f for f in salt if f not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
    if missing:
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = (
            *shared.DATASET_HASH_CONFIG_EXTRA_FIELDS,
            *missing,
        )


def _resolve_default_model(cfg: dict) -> None:
    # `base_model: prefalign:default` is the embedded SmolLM2-135M-Instruct, so a
    # shared YAML runs offline on any machine with the package installed.
    for key in ("base_model", "tokenizer_config"):
        if cfg.get(key) == DEFAULT_MODEL_ALIAS:
            from ...core.models import prepare_default_model

            cfg[key] = str(prepare_default_model())


def _one_row_debug_sample() -> None:
    # Shim (Axolotl 0.19-0.21): `axolotl preprocess` prints a random sample drawn
    # by `sample_dataset` with randrange(0, len - 1), which raises "empty range"
    # for a one-row dataset after the data were prepared. Draw from the full range.
    import random

    from axolotl.common import datasets as common

    if getattr(common.sample_dataset, "_prefalign", False):
        return

    def sample_dataset(dataset: Any, num_samples: int) -> Any:
        picks = [random.randrange(len(dataset)) for _ in range(num_samples)]  # nosec
        return dataset.select(picks)

    sample_dataset._prefalign = True
    common.sample_dataset = sample_dataset


LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")


def _cpu_safe_lora_kernels(cfg: dict) -> None:
    # Axolotl turns on its fused LoRA kernels by default; they call CUDA stream
    # APIs, so QLoRA on a machine without a GPU would crash inside them.
    import torch

    if torch.cuda.is_available() or not cfg.get("adapter"):
        return
    for key in LORA_KERNELS:
        if cfg.get(key) is None:
            cfg[key] = False
    LOG.info("prefalign: no CUDA device: Axolotl's fused LoRA kernels are off")


# Axolotl DPO settings that our trainer would silently bypass or ignore, with what
# to use instead under `prefalign:`.
CONFLICTING_DPO_KEYS = {
    "dpo_loss_type": "prefalign.loss",
    "dpo_loss_weights": "one prefalign.loss",
    "dpo_label_smoothing": "prefalign.loss: cdpo (or robust) with "
    "prefalign.label_smoothing",
    "dpo_use_liger_kernel": "prefalign's own fused log-prob path (leave it unset)",
    "dpo_use_weighting": "nothing: WPO weighting is not implemented by prefalign",
    "dpo_padding_free": "prefalign.packing: true",
    "dpo_norm_loss": "prefalign.loss: ipo (length-normalised)",
    # Axolotl >= 0.21: LD-DPO's length desensitisation lives in TRL's own loss.
    "dpo_ld_alpha": "nothing: LD-DPO is not implemented by prefalign",
    "rpo_alpha": "nothing: the RPO NLL term is not implemented by prefalign",
    "pad_to_multiple_of": "nothing (leave it unset): it switches Axolotl to a "
    "collator whose batches the prefalign trainer does not read",
}


def _reject_conflicting_dpo_keys(cfg: dict) -> None:
    bad = [k for k in CONFLICTING_DPO_KEYS if cfg.get(k) not in (None, False)]
    if bad:
        advice = "; ".join(f"{k} → use {CONFLICTING_DPO_KEYS[k]}" for k in bad)
        raise PrefAlignConfigError(
            "these Axolotl DPO settings conflict with prefalign's DPO trainer "
            f"(it would bypass or ignore them): {advice}"
        )


# Names Axolotl gives a model's output head (its `get_linear_embedding_layers`).
OUTPUT_HEADS = ("lm_head", "embed_out")


def _lora_on_output_head(targets: Any) -> str | None:
    """The lora_target_modules entry that puts LoRA on the output head, if any."""
    if isinstance(targets, str):  # PEFT: a regex matched against module names
        hit = any(re.fullmatch(targets, head) for head in OUTPUT_HEADS)
        return targets if hit else None
    return next(
        (t for t in targets or [] if str(t).split(".")[-1] in OUTPUT_HEADS), None
    )


def _model_config(cfg: dict) -> Any:
    # The config only (no weights): None when it cannot be read here (a hub model
    # offline, a typo); Axolotl then reports the problem itself when it loads.
    from transformers import AutoConfig

    name = cfg.get("base_model_config") or cfg.get("base_model")
    if not name:
        return None
    try:
        config = AutoConfig.from_pretrained(
            name,
            trust_remote_code=cfg.get("trust_remote_code") is True,
            revision=cfg.get("revision_of_model"),
        )
    except (OSError, ValueError):
        return None
    for key, value in (cfg.get("overrides_of_model_config") or {}).items():
        setattr(config, key, value)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _reject_unsupported_heads(cfg: dict) -> None:
    # The fused log-prob path multiplies by the lm_head's weight itself; say what
    # it cannot reproduce now, not after the model and the data have loaded.
    from ...core.heads import logit_postprocessing

    target = _lora_on_output_head(cfg.get("lora_target_modules"))
    if cfg.get("adapter") and target is not None:
        raise PrefAlignConfigError(
            f"lora_target_modules: {target!r} puts LoRA on the lm_head, which "
            "prefalign's fused log-prob path cannot reproduce; remove it from "
            "lora_target_modules, and to train the head list it in "
            "lora_modules_to_save instead (e.g. lora_modules_to_save: "
            "[embed_tokens, lm_head]: a full trainable copy, the reference keeps "
            "the original)"
        )
    found = logit_postprocessing(_model_config(cfg))
    if found is not None:
        raise PrefAlignConfigError(
            f"base_model: {cfg.get('base_model')} post-processes its logits "
            f"(config.{found[0]} = {found[1]}), which prefalign's fused log-prob "
            "path does not reproduce; train this model with Axolotl's own DPO "
            "(remove prefalign.loss and prefalign.fused_logprobs)"
        )


def _curriculum_order_kept(cfg: dict, curriculum: str | None) -> None:
    # Axolotl shuffles the prepared rows (merge) and samples them at random unless
    # told otherwise; a curriculum it shuffles away would train as plain SFT.
    if not curriculum:
        return
    from ...contrast.format import TYPE_NAME

    entries = list(cfg.get("datasets") or [])
    fixes = []
    if not any((d or {}).get("type") == TYPE_NAME for d in entries):
        raise PrefAlignConfigError(
            f"prefalign.contrast.curriculum: {curriculum} orders the rows of a "
            f"`type: {TYPE_NAME}` dataset, but no entry of datasets has that type"
        )
    if cfg.get("curriculum_sampling") is not True:
        fixes.append("curriculum_sampling: true (else rows are sampled at random)")
    if len(entries) > 1 and cfg.get("shuffle_merged_datasets") is not False:
        fixes.append(
            f"shuffle_merged_datasets: false (the {len(entries)} datasets are "
            "merged and shuffled; Axolotl's default is true)"
        )
    if len(entries) > 1 and cfg.get("shuffle_before_merging_datasets"):
        fixes.append("shuffle_before_merging_datasets: false")
    if cfg.get("sample_packing") and not cfg.get("sample_packing_sequentially"):
        fixes.append(
            "sample_packing_sequentially: true (packing otherwise regroups rows "
            "by length)"
        )
    if fixes:
        raise PrefAlignConfigError(
            f"prefalign.contrast.curriculum: {curriculum} puts the rows in order, "
            "but this config would shuffle them; set " + "; set ".join(fixes)
        )


class PrefAlignPlugin(BasePlugin):
    """SPA, plaintext contrast SFT, RobustFT and a fused log-prob path for Axolotl."""

    def get_input_args(self) -> str:
        return "axolotl_prefalign.integrations.axolotl.args.PrefAlignArgs"

    def register(self, cfg: dict) -> None:
        # Runs on the raw YAML before Axolotl's schema drops unknown keys: validate
        # our block here so a typo fails loudly, and install our trainer class.
        _stop_axolotl_telemetry()
        _use_axolotl_logging()
        pa = prefalign_config(cfg)
        _salt_dataset_hash()
        _one_row_debug_sample()
        precheck_datasets(cfg, pa)
        _resolve_default_model(cfg)
        _cpu_safe_lora_kernels(cfg)
        _curriculum_order_kept(cfg, pa.contrast.curriculum)
        if pa.trainer_active:
            rl = cfg.get("rl")
            rl = getattr(rl, "value", rl)
            if rl != "dpo":
                what = f"prefalign.loss: {pa.loss}" if pa.loss else "fused_logprobs"
                raise PrefAlignConfigError(
                    f"{what} runs under `rl: dpo`, but rl is {rl!r}; set `rl: dpo` "
                    "(the loss is chosen by prefalign.loss, not rl)"
                )
            _reject_conflicting_dpo_keys(cfg)
            _reject_unsupported_heads(cfg)
            check_scale_out(cfg)
            self._install_trainer(cfg, TRAINER_CLS)
        elif pa.contrast.unlikelihood_weight > 0 and not cfg.get("rl"):
            self._install_trainer(cfg, SFT_TRAINER_CLS)

    @staticmethod
    def _install_trainer(cfg: dict, dotted: str) -> None:
        # `trainer_cls:` is the one path on which Axolotl passes the model (and the
        # reference model) to the trainer; a plugin's get_trainer_cls gets neither.
        current = cfg.get("trainer_cls")
        if current and current != dotted:
            raise PrefAlignConfigError(
                f"trainer_cls is set to {current!r}, but the prefalign: block needs "
                f"{dotted!r}; remove trainer_cls or subclass {dotted}"
            )
        cfg["trainer_cls"] = dotted
        LOG.info("prefalign: using trainer %s", dotted)

    def get_training_args(self, cfg: Any) -> dict[str, Any] | None:
        pa = prefalign_config(cfg)
        if not pa.trainer_active:
            return None
        out: dict[str, Any] = {}
        if pa.reference_cache:
            # TRL caches the reference pass keyed by dataset fingerprint + model
            # hash; our trainer's compute_ref_log_probs fills it on the fused path.
            out["precompute_ref_log_probs"] = True
        trl_beta = cfg.get("trl", {}).get("beta") if cfg.get("trl") else None
        if pa.loss == "spa" and cfg.get("rl_beta") is None and trl_beta is None:
            out["beta"] = pa.spa.beta
        return out

    def get_collator_cls_and_kwargs(self, cfg: Any, is_eval: bool = False):
        # Only the SFT builder asks. Plain None (never a tuple of Nones) keeps
        # Axolotl's default collator; contrast SFT with unlikelihood needs its own
        # to carry the negative-answer mask.
        pa = prefalign_config(cfg)
        if cfg.get("rl") or pa.contrast.unlikelihood_weight <= 0:
            return None
        from .contrast import collator_for

        return collator_for(cfg, is_eval=is_eval)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        # Our trainers write the run's model card themselves; Axolotl's own SFT
        # trainer (contrast, RobustFT dataset types) gets the same card here.
        from .model_card import attach_card

        attach_card(trainer, cfg)

    def post_model_load(self, cfg: Any, model: Any) -> None:
        pa = prefalign_config(cfg)
        if pa.trainer_active and cfg.get("adapter") is None:
            LOG.warning(
                "prefalign: no adapter: the DPO reference is a frozen copy of the "
                "model (2× weights in memory); use adapter: lora/qlora to take the "
                "reference from the same model with the adapter disabled"
            )
