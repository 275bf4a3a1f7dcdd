"""LLaMA-Factory's DPO trainer with prefalign's step (installed by the launcher).

`run_dpo` imports `CustomDPOTrainer` inside the function, so the launcher puts this
subclass in its place before `run_exp`. Only `get_batch_loss_metrics` changes: the
log-probs come from the fused path of `core.preference.PreferenceStep` (no
[2B, L, V] fp32 logits) and the loss is ours (sigmoid, cdpo, robust, ipo, hinge,
spa with self-refinement and DND), whatever trl version LLaMA-Factory runs on.
Everything else (optimizer, scheduler, reference model creation, logging) is
LLaMA-Factory's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer

from ...core.config import PrefAlignConfig
from ...core.logprobs import IGNORE_INDEX
from ...core.preference import PreferenceStep


class PrefAlignLFTrainer(CustomDPOTrainer):
    """LLaMA-Factory's `CustomDPOTrainer` whose loss is `PreferenceStep`."""

    # Set by the launcher (LLaMA-Factory builds the trainer with its own arguments).
    prefalign: PrefAlignConfig = PrefAlignConfig()
    # What the launcher checks after training, so that a run where another trainer
    # did the work fails loudly while one with nothing left to train does not:
    # trainers built, batches computed with our step, and (step, max_steps, the
    # checkpoint it resumed from) where the last `train()` ended.
    built = 0
    batches_seen = 0
    ended_at: tuple[int, int, str | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pref_step = PreferenceStep(self.prefalign, self._reference_context)
        type(self).built += 1

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """Trainer.train, recording the step it ended at (a finished run resumed
        from its last checkpoint ends where it started, without a batch)."""
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        resumed = resume_from_checkpoint
        if resumed is True:  # Trainer's "the last checkpoint in output_dir"
            resumed = f"the last checkpoint in {self.args.output_dir}"
        resumed = resumed and str(resumed)
        type(self).ended_at = (self.state.global_step, self.state.max_steps, resumed)
        return result

    def _reference_context(self, model):
        # As LLaMA-Factory: LoRA has no reference copy; the policy with the adapter
        # disabled is the reference. Full/freeze tuning made a frozen copy.
        if self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(model)
            return unwrapped, unwrapped.disable_adapter()
        return self.ref_model, contextlib.nullcontext()

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """prefalign's loss and metrics of one LLaMA-Factory pairwise batch."""
        # LLaMA-Factory's pairwise collator: chosen rows, then rejected rows; labels
        # are the input ids on response tokens and -100 elsewhere (prompt, padding).
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
        }
        training = train_eval == "train"
        out = self.pref_step(
            model,
            inputs,
            beta=self.beta,
            training=training,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
        )
        type(self).batches_seen += 1
        prefix = "" if training else "eval_"
        # LLaMA-Factory averages stored metrics per log step and reduces them
        # across processes itself: plain floats of this process.
        metrics = {
            prefix + name: value.float().mean().item()
            if torch.is_tensor(value)
            else float(value)
            for name, value in out.metrics.items()
        }
        return out.losses.mean(), metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # No full logits exist on the fused path (TRL's step would read
        # `eval_logits/*`): evaluation reports the loss and the reward metrics.
        with torch.no_grad():
            loss, metrics = self.get_batch_loss_metrics(model, inputs, "eval")
        self.store_metrics(metrics, train_eval="eval")
        return loss.detach(), None, None
