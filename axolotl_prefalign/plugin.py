"""The Axolotl plugin: `plugins: [axolotl_prefalign.PrefAlignPlugin]`."""

from __future__ import annotations

import logging
import os
from typing import Any

from axolotl.integrations.base import BasePlugin

from .args import PrefAlignConfig, PrefAlignConfigError

LOG = logging.getLogger("axolotl_prefalign")

TRAINER_CLS = "axolotl_prefalign.trainers.PrefAlignDPOTrainer"
SFT_TRAINER_CLS = "axolotl_prefalign.trainers.ContrastSFTTrainer"


def prefalign_config(cfg: Any) -> PrefAlignConfig:
    """The validated `prefalign:` block of an Axolotl config (raw or validated)."""
    raw = cfg.get("prefalign") if hasattr(cfg, "get") else None
    return PrefAlignConfig.from_raw(raw)


def _salt_dataset_hash() -> None:
    # Axolotl's prepared-dataset hash ignores plugin settings; our formats depend on
    # `prefalign:` (template, masking, denoising), so a changed setting must not
    # reuse a stale cache. The hash reads this module global at call time.
    from axolotl.utils.data import shared

    if "prefalign" not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS:
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = (
            *shared.DATASET_HASH_CONFIG_EXTRA_FIELDS,
            "prefalign",
        )


class PrefAlignPlugin(BasePlugin):
    """SPA, plaintext contrast SFT, RobustFT and a fused log-prob path for Axolotl."""

    def get_input_args(self) -> str:
        return "axolotl_prefalign.args.PrefAlignArgs"

    def register(self, cfg: dict) -> None:
        # Runs on the raw YAML before Axolotl's schema drops unknown keys: validate
        # our block here so a typo fails loudly, and install our trainer class.
        os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
        pa = prefalign_config(cfg)
        _salt_dataset_hash()
        if pa.trainer_active:
            rl = cfg.get("rl")
            rl = getattr(rl, "value", rl)
            if rl != "dpo":
                what = f"prefalign.loss: {pa.loss}" if pa.loss else "fused_logprobs"
                raise PrefAlignConfigError(
                    f"{what} runs under `rl: dpo`, but rl is {rl!r}; set `rl: dpo` "
                    "(the loss is chosen by prefalign.loss, not rl)"
                )
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

    def get_collator_cls_and_kwargs(self, cfg: Any, is_eval: bool = False):
        # Only the SFT builder asks. Plain None (never a tuple of Nones) keeps
        # Axolotl's default collator; contrast SFT with unlikelihood needs its own
        # to carry the negative-answer mask.
        pa = prefalign_config(cfg)
        if cfg.get("rl") or pa.contrast.unlikelihood_weight <= 0:
            return None
        from .contrast import collator_for

        return collator_for(cfg, is_eval=is_eval)

    def post_model_load(self, cfg: Any, model: Any) -> None:
        pa = prefalign_config(cfg)
        if pa.trainer_active and cfg.get("adapter") is None:
            LOG.warning(
                "prefalign: no adapter: the DPO reference is a frozen copy of the "
                "model (2× weights in memory); use adapter: lora/qlora to take the "
                "reference from the same model with the adapter disabled"
            )
