"""The plugin's DPO trainer for `rl: dpo` (installed through `trainer_cls:`).

A subclass of Axolotl's DPO trainer whose loss is `core.preference.PreferenceStep`:
one policy forward over chosen and rejected together (TRL's collator stacks them),
the fused log-prob path, and prefalign's losses. The reference is the same model
with its LoRA adapter disabled (no second copy in memory), a separate frozen model
for full fine-tuning, or TRL's per-dataset cache (`prefalign.reference_cache`).
This module only connects that step to TRL: the reference context, the collator,
the evaluation step and the metric log.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from torch import nn
from trl.trainer.utils import use_adapter

from ....core.config import PrefAlignConfig, prefalign_config
from ....core.preference import JUDGE_FIELDS, JudgeFieldsCollator, PreferenceStep
from ..model_card import CardMixin


def _current_prefalign() -> PrefAlignConfig:
    # Axolotl builds `trainer_cls` itself, without our arguments: the plugin
    # manager holds the config it registered.
    from axolotl.integrations.base import PluginManager

    cfg = PluginManager.get_instance().cfg
    return prefalign_config(cfg) if cfg is not None else PrefAlignConfig()


class PrefAlignDPOTrainer(CardMixin, AxolotlDPOTrainer):
    """Axolotl's DPO trainer with the fused log-prob path and prefalign's losses;
    its model card is the run's (`model_card.CardMixin`)."""

    tag_names = ["axolotl", "dpo", "prefalign"]

    def __init__(self, *args: Any, prefalign: PrefAlignConfig | None = None, **kw):
        # Set before TRL's __init__: it may precompute reference log-probs there.
        self.prefalign = prefalign or _current_prefalign()
        self.pref_step = PreferenceStep(self.prefalign, self._reference_context)
        super().__init__(*args, **kw)
        self.data_collator = JudgeFieldsCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        # Keep SPA's judge fields even under remove_unused_columns: true.
        super()._set_signature_columns_if_needed()
        for name in JUDGE_FIELDS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)

    def _reference_context(self, model: nn.Module):
        unwrapped = self.accelerator.unwrap_model(model)
        if self.ref_model is None and hasattr(unwrapped, "disable_adapter"):
            # As TRL: a fresh adapter's reference is the model with adapters off; a
            # re-trained adapter's is the frozen "ref" copy TRL made at start-up.
            name = "ref" if "ref" in unwrapped.peft_config else None
            return unwrapped, use_adapter(unwrapped, adapter_name=name)
        if self.ref_model is None:
            raise ValueError(
                "prefalign: no reference model: use adapter: lora/qlora (the "
                "reference is the model with the adapter disabled) or keep "
                "Axolotl's frozen reference copy"
            )
        return self.ref_model, contextlib.nullcontext()

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one batch (TRL calls this to fill its cache)."""
        return self.pref_step.reference_logps(
            model, inputs, step=self.state.global_step
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # No full logits exist on the fused path: evaluation reports the loss and
        # the reward metrics only.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        # Always our loss: TRL would route to its own (liger) loss on a flag.
        mode = "train" if self.model.training else "eval"
        out = self.pref_step(
            model,
            inputs,
            beta=self.beta,
            training=mode == "train",
            step=self.state.global_step,
            max_steps=self.state.max_steps,
        )
        self._log_metrics(mode, inputs, out.metrics)
        loss = out.losses.mean()
        return (loss, None) if return_outputs else loss

    def _log_metrics(self, mode: str, inputs, metrics) -> None:
        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        for name, value in metrics.items():
            if torch.is_tensor(value):
                value = gather(value).mean().item()
            m[name].append(value)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        m["num_tokens"] = [self._total_train_tokens]
