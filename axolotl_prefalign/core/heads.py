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
head holds its whole weight only there (`_whole_head`):

- plain, DDP, DeepSpeed ZeRO-1/2: the parameters as they are (always whole);
- DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` on the parameters not
  already available, released at the end of the `with`;
- FSDP2: the `DTensor` shard's `full_tensor()` (an all-gather).

A trainable sharded head keeps nothing whole until the backward: the fused path's
saved weight is gathered again when the backward unpacks it, and its gradient flows
back through the autograd graph of the parameter (ZeRO-3: into the parameter, whose
DeepSpeed hook reduce-scatters it; FSDP2: through `full_tensor`'s backward, a
reduce-scatter averaged like FSDP's own). Every gather runs once per `with` (and
once per backward) on every rank whatever its batch holds, so no rank waits alone.
Under FSDP2, hidden states captured inside the forward go through `through_output`,
so that the backward re-gathers the root's resharded parameters. FSDP1's flat
parameters are refused. Models that post-process their logits, and
heads the path cannot reproduce (LoRA on the lm_head itself), are refused with the
setting to change.
"""

from __future__ import annotations

import contextlib

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


def lm_head_weights(
    model: nn.Module,
) -> contextlib.AbstractContextManager[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of the lm_head as the model's forward uses it now."""
    return head_weights(head_in_use(model))


def head_weights(
    head: nn.Linear,
) -> contextlib.AbstractContextManager[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of `head` (from `head_in_use`), whole for the `with`.

    Pick the head with `head_in_use` while the model's mode is the one to use, and
    hold it whole only around the computation: a model forward inside the `with`
    that uses the same ZeRO-3 parameter releases it when its module ends.
    """
    return _whole_head(head.weight, head.bias)


def through_output(model: nn.Module, hidden: torch.Tensor, output: object):
    """`hidden`, captured inside the model's forward, made to start the backward
    hooks of the model's output too.

    FSDP2 gathers a unit's resharded parameters again when the gradient of that
    unit's forward output arrives. The fused path uses the decoder's hidden states,
    never the root's output (the logits of one position), so the root's final norm
    and embeddings would reach the backward freed. A zero gradient for the logits
    starts the root's hooks; nothing changes where no head parameter is a DTensor.
    """
    logits = getattr(output, "logits", None)
    if not (
        torch.is_grad_enabled()
        and isinstance(logits, torch.Tensor)
        and logits.requires_grad
        and _is_dtensor(head_in_use(model).weight)
    ):
        return hidden
    return _ZeroGradTo.apply(hidden, logits)


class _ZeroGradTo(torch.autograd.Function):
    """hidden unchanged; in the backward also a zero gradient for `logits`."""

    @staticmethod
    def forward(ctx, hidden, logits):
        ctx.logits = (logits.shape, logits.dtype, logits.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.logits
        return grad, torch.zeros(shape, dtype=dtype, device=device)


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


def _whole_head(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> contextlib.AbstractContextManager[tuple[torch.Tensor, torch.Tensor | None]]:
    """The context that holds (weight, bias) whole, by how they are sharded."""
    params = [p for p in (weight, bias) if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        return _zero3_whole(weight, bias)
    if any(_is_dtensor(p) for p in params):
        return _dtensor_whole(weight, bias)
    if weight.dim() != 2 or weight.numel() == 0:
        raise RuntimeError(FSDP1_REFUSAL)
    return contextlib.nullcontext((weight, bias))


FSDP1_REFUSAL = (
    "prefalign's fused log-prob path reads the lm_head outside its forward, where "
    "FSDP1's flat parameters leave an empty view: use FSDP2 (fsdp_version: 2) or "
    "DeepSpeed ZeRO-3 (docs/multi-gpu.md)"
)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _needs_grad(params: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


@contextlib.contextmanager
def _zero3_whole(weight, bias):
    """ZeRO-3: gather the partitioned parameters for the `with`; a trainable head
    is gathered again when the backward unpacks it (`_regather`)."""
    params = [p for p in (weight, bias) if p is not None]
    with _gathered(params):
        if not _needs_grad(params):
            yield weight, bias
            return
        pairs = [(p, p) for p in params]
        with torch.autograd.graph.saved_tensors_hooks(
            _pack_as(pairs, _regather), _unpack
        ):
            yield weight, bias


def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """GatheredParameters on the parameters not available now (one persistent or in
    use by a module stays as DeepSpeed holds it: releasing it would break that)."""
    from deepspeed.runtime.zero.partition_parameters import (
        GatheredParameters,
        ZeroParamStatus,
    )

    missing = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not missing:
        return contextlib.nullcontext()
    return GatheredParameters(missing, modifier_rank=None)


def _regather(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a trainable ZeRO-3 parameter, for the backward.

    The parameter stays gathered until its gradient has accumulated: autograd
    shapes the gradient like the parameter's data at that moment, and DeepSpeed's
    own hook (registered first) then reduce-scatters it. A later hook releases it,
    unless a module of the model (a tied embedding) is still using it, which
    DeepSpeed then releases itself."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.AVAILABLE:
        param.all_gather()

        def release(p: torch.Tensor) -> None:
            handle.remove()
            if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules:
                p.partition()

        handle = param.register_post_accumulate_grad_hook(release)
    return param.data


@contextlib.contextmanager
def _dtensor_whole(weight, bias):
    """FSDP2: the whole head from its `DTensor` shards. A trainable head's
    `full_tensor` hands its gradient back as an average over the mesh, reduce-
    scattered onto the shard: what FSDP's own reduction gives every parameter."""
    params = [p for p in (weight, bias) if p is not None]
    if not _needs_grad(params):
        yield _full_again(weight), None if bias is None else _full_again(bias)
        return
    pairs = [(_full_with_grad(p), p) for p in params]
    with torch.autograd.graph.saved_tensors_hooks(
        _pack_as(pairs, _full_again), _unpack
    ):
        yield pairs[0][0], None if bias is None else pairs[1][0]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _full_again(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor in the backward (no graph: the gradient
    already has its path through the forward's `full_tensor`)."""
    with torch.no_grad():
        return _full(tensor)


def _full_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(tensor):
        return tensor
    from torch.distributed.tensor import Partial

    avg = [Partial("avg")] * tensor.device_mesh.ndim
    return tensor.full_tensor(grad_placements=avg)


def _pack_as(pairs: list[tuple[torch.Tensor, torch.Tensor]], regather):
    """A saved-tensor pack hook: a whole head tensor of `pairs` (whole, source) is
    saved as a note to gather `regather(source)` in the backward, so nothing
    vocabulary-sized stays whole between the forward and the backward."""

    def pack(tensor: torch.Tensor):
        for whole, source in pairs:
            if tensor is whole:
                return _Regather(source, regather)
        return tensor

    return pack


class _Regather:
    """A saved head tensor, to be gathered again when the backward needs it."""

    def __init__(self, tensor: torch.Tensor, regather):
        self.tensor, self.regather = tensor, regather


def _unpack(saved):
    return saved.regather(saved.tensor) if isinstance(saved, _Regather) else saved
