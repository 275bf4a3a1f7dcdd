"""The lm_head weights the fused log-prob path multiplies by, as the model uses them.

The fused path computes logits as `hidden @ W.T + b` itself, outside the head's own
forward. `lm_head_weights(model)` gives the (W, b) that the model's forward would use
for its logits in the model's current mode, for every user of the path (the DPO
trainers and their reference pass, SPA's judge, eval-pairs, RobustFT):

- a plain `nn.Linear` head: its weight (tied to the input embeddings or not);
- PEFT `modules_to_save` (`ModulesToSaveWrapper`): the active adapter's trainable copy,
  or the original head while the adapter is disabled (the DPO reference), by the
  wrapper's own forward rule.

Read it AFTER the decoder forward and use the weights inside the `with`: a sharded
head (DeepSpeed ZeRO-3, FSDP) holds its full weight only there; such heads are
refused for now. Models that post-process their logits, and heads the path cannot
reproduce (LoRA on the lm_head itself), are refused with the setting to change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def logit_postprocessing(config: object) -> tuple[str, object] | None:
    """(attribute, value) of a config whose logits are not plain lm_head(hidden)."""
    for attr in LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return attr, value
    return None


@contextlib.contextmanager
def lm_head_weights(
    model: nn.Module,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the lm_head as the model's forward uses it now."""
    head = head_in_use(model)
    _check_not_sharded(head.weight)
    yield head.weight, head.bias


def head_in_use(model: nn.Module) -> nn.Linear:
    """The nn.Linear the model's forward computes its logits with, in its mode now."""
    causal = causal_lm(model)
    found = logit_postprocessing(getattr(causal, "config", None))
    if found is not None:
        raise NotImplementedError(
            "prefalign's fused log-prob path computes logits as lm_head(hidden); "
            f"this model post-processes them (config.{found[0]} = {found[1]}), "
            "which the path does not reproduce"
        )
    head = _active_copy(causal.get_output_embeddings())
    if not isinstance(head, nn.Linear):
        raise TypeError(_unsupported_head(head))
    return head


def _active_copy(head: nn.Module) -> nn.Module:
    """The module a PEFT `ModulesToSaveWrapper` calls now; any other head as is."""
    copies = getattr(head, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict) or not hasattr(head, "original_module"):
        return head
    # The wrapper's forward rule: the original head while adapters are disabled
    # (the DPO reference) or an active adapter has no copy, else the first active
    # adapter's copy (PEFT allows one active copy per wrapped module).
    active = head.active_adapters
    if head.disable_adapters or not active or any(a not in copies for a in active):
        return head.original_module
    return copies[active[0]]


def _unsupported_head(head: nn.Module) -> str:
    name = type(head).__name__
    if hasattr(head, "lora_A"):
        return (
            f"prefalign's fused log-prob path cannot reproduce a LoRA layer on the "
            f"lm_head ({name}): remove lm_head from the LoRA targets (Axolotl: "
            "lora_target_modules; LLaMA-Factory: lora_target) and train it fully "
            "instead with lora_modules_to_save: [lm_head] (LLaMA-Factory: "
            "additional_target: lm_head)"
        )
    return (
        "prefalign's fused log-prob path needs the lm_head to be an nn.Linear, "
        f"optionally in PEFT modules_to_save; this model's is {name}"
    )


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
