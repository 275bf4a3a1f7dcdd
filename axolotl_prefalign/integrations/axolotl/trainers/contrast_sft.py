"""Contrast SFT trainer: cross-entropy on the positive answer plus an optional
CUT-style unlikelihood term on the negative answer (docs/methods.md#contrast).

The plugin installs `ContrastSFTTrainer` through `trainer_cls:` when
`prefalign.contrast.unlikelihood_weight > 0` (SFT, no `rl:`), and the collators
below through its collator hook, so the `negative_labels` column written by the
contrast format reaches `compute_loss` padded like `labels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.collators import (
    BatchSamplerDataCollatorForSeq2Seq,
    DataCollatorForSeq2Seq,
    V2BatchSamplerDataCollatorForSeq2Seq,
)

from ....contrast.format import NEGATIVE_LABELS
from ....core.logprobs import IGNORE_INDEX
from ..model_card import CardMixin


def unlikelihood_loss(
    logits: torch.Tensor, negative_labels: torch.Tensor
) -> torch.Tensor:
    """Mean over negative-answer tokens of -log(1 - p(token)); 0 when there are none.

    CUT (Xu et al. 2023, "Reasons to reject?"): L_UL = -Σ_t log(1 - p_θ(y_t | y_<t)).
    Labels are next-token targets like `labels` (shifted here, as in the model).
    """
    targets = negative_labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if not mask.any():
        return logits.new_zeros((), dtype=torch.float32)
    z = logits[:, :-1][mask].float()  # [n, V]: only the negative positions
    y = targets[mask]
    # log(1 - p_y) = logsumexp_{v≠y} z_v - logsumexp_v z_v: exact, and finite with
    # a useful gradient even when p_y rounds to 1.
    others = z.scatter(-1, y[:, None], float("-inf"))
    log_one_minus_p = torch.logsumexp(others, -1) - torch.logsumexp(z, -1)
    return -log_one_minus_p.mean()


class ContrastSFTTrainer(CardMixin, AxolotlTrainer):
    """AxolotlTrainer whose loss adds `weight × unlikelihood_loss` when weight > 0;
    its model card is the run's (`model_card.CardMixin`)."""

    def __init__(self, *args: Any, unlikelihood_weight: float | None = None, **kwargs):
        self._unlikelihood_weight = unlikelihood_weight
        super().__init__(*args, **kwargs)

    @property
    def unlikelihood_weight(self) -> float:
        """prefalign.contrast.unlikelihood_weight (constructor value wins)."""
        if self._unlikelihood_weight is None:
            from axolotl.integrations.base import PluginManager

            from ....core.config import prefalign_config

            cfg = self.axolotl_cfg or PluginManager.get_instance().cfg
            self._unlikelihood_weight = (
                prefalign_config(cfg).contrast.unlikelihood_weight if cfg else 0.0
            )
        return self._unlikelihood_weight

    def _set_signature_columns_if_needed(self) -> None:
        # Keep our column: the Trainer drops dataset columns the model's forward
        # does not take, and compute_loss removes it before the forward.
        super()._set_signature_columns_if_needed()
        if NEGATIVE_LABELS not in self._signature_columns:
            self._signature_columns.append(NEGATIVE_LABELS)

    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        negative_labels = inputs.pop(NEGATIVE_LABELS, None)
        weight = self.unlikelihood_weight
        if negative_labels is None or weight <= 0:
            return super().compute_loss(
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        if logits is None:
            raise RuntimeError(
                "prefalign.contrast.unlikelihood_weight needs the model's logits, "
                "but the forward returned none (a fused cross-entropy plugin such "
                "as cut_cross_entropy / liger fused linear CE is on)"
            )
        term = unlikelihood_loss(logits, negative_labels.to(logits.device))
        scaled = weight * term
        trainer_divides = (
            not self.model_accepts_loss_kwargs or num_items_in_batch is None
        ) and self.compute_loss_func is None
        if model.training and not trainer_divides:
            # The CE loss is then already normalised over the whole accumulated
            # batch and training_step will not divide by the accumulation steps:
            # do it for our per-micro-batch mean (the same rule as training_step).
            steps = getattr(
                self,
                "current_gradient_accumulation_steps",
                self.args.gradient_accumulation_steps,
            )
            scaled = scaled / steps
        split = "train" if model.training else "eval"
        self.store_metrics({"unlikelihood": term.detach().item()}, train_eval=split)
        loss = loss + scaled.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


def _pad_negative_labels(features: list[dict], multiple: int | None, side: str) -> None:
    """Pad `negative_labels` with -100 to the length `labels` will be padded to."""
    if not features or NEGATIVE_LABELS not in features[0]:
        return
    longest = max(len(f[NEGATIVE_LABELS]) for f in features)
    if multiple:
        longest = (longest + multiple - 1) // multiple * multiple
    for f in features:
        value = f[NEGATIVE_LABELS]
        pad = [IGNORE_INDEX] * (longest - len(value))
        if isinstance(value, list):
            f[NEGATIVE_LABELS] = value + pad if side == "right" else pad + value
        else:
            parts = [value, pad] if side == "right" else [pad, value]
            f[NEGATIVE_LABELS] = np.concatenate(parts).astype(np.int64)


class _NegativeLabelsPadding:
    def __call__(self, features, return_tensors=None):
        _pad_negative_labels(
            features, self.pad_to_multiple_of, self.tokenizer.padding_side
        )
        return super().__call__(features, return_tensors=return_tensors)


@dataclass
class ContrastDataCollator(_NegativeLabelsPadding, DataCollatorForSeq2Seq):
    """Axolotl's seq2seq collator that also pads `negative_labels`."""


@dataclass
class ContrastBatchSamplerCollator(
    BatchSamplerDataCollatorForSeq2Seq, ContrastDataCollator
):
    """Axolotl's packing collator that also pads `negative_labels`."""


@dataclass
class ContrastV2BatchSamplerCollator(
    V2BatchSamplerDataCollatorForSeq2Seq, ContrastDataCollator
):
    """Axolotl's V2 packing collator that also pads `negative_labels`."""
