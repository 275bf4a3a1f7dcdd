"""The lm_head the fused log-prob path multiplies by, found inside any wrapper.

The fused path computes logits as `hidden @ W.T + b` itself. That is only the model's
own logits when the model applies nothing after its lm_head, and only possible when
the full weight is present on this process; both are checked here, once, for every
user of the path (the DPO trainer, SPA's judge).
"""

from __future__ import annotations

import torch
from torch import nn

# Config attributes of models whose logits are lm_head(hidden) post-processed.
LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",  # Gemma-2/3
    "logit_scale",  # Cohere
    "logits_scaling",  # Granite
)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside accelerate/DDP and PEFT wrappers.

    A PeftModel's base model keeps the LoRA layers (and `disable_adapter` switches
    them), so its decoder forward is the adapted model's.
    """
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def plain_lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the model's lm_head, after checking logits = lm_head(h)."""
    causal = causal_lm(model)
    config = getattr(causal, "config", None)
    for attr in LOGIT_POSTPROCESSING:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                "prefalign's fused log-prob path computes logits as lm_head(hidden); "
                f"this model post-processes them (config.{attr} = "
                f"{getattr(config, attr)}), which the path does not reproduce"
            )
    head = causal.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            "prefalign's fused log-prob path needs a plain nn.Linear lm_head, got "
            f"{type(head).__name__}; do not put lm_head in lora_target_modules"
        )
    _check_not_sharded(head.weight)
    return head.weight, head.bias


def _check_not_sharded(weight: torch.Tensor) -> None:
    # The fused path reads lm_head.weight outside the head's own forward, where
    # ZeRO-3 / FSDP full sharding leave only a shard (or an empty placeholder).
    sharded = (
        hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 parameter
        or type(weight).__name__ == "DTensor"  # FSDP2
        or weight.dim() != 2
        or weight.numel() == 0  # FSDP1 flat-parameter view outside forward
    )
    if sharded:
        raise RuntimeError(
            "prefalign's fused log-prob path does not support a sharded lm_head "
            "(DeepSpeed ZeRO-3 or FSDP full sharding) yet: use DDP or ZeRO-1/2 "
            "(docs/multi-gpu.md)"
        )
