"""Per-token log-probs of target tokens through the LM head, chunk by chunk.

    log p(y_t) = z_t[y_t] − logsumexp(z_t),        z_t = W h_t + b

The plain path builds z for every position ([tokens, V]: 2.1 GB in fp32 for one Llama-3
pair of 2×2048 tokens) and autograd keeps several tensors of that size. Here only the
positions that carry a label reach the head, a chunk of rows at a time, and the
gradient w.r.t. h is formed in the forward pass (METHODS.md §4):

    d log p(y_t) / d h_t = W[y_t] − Σ_v p_tv W[v] = (onehot(y_t) − p_t) W

one [chunk, V] × [V, H] product right after the log-sum-exp, kept as a [tokens, H]
tensor, so the backward needs no second pass over the vocabulary (two vocabulary-sized
products per step; a backward that recomputes the logits needs three). The weight
gradient Σ_t g_t (onehot(y_t) − p_t)ᵀ h_t needs the probabilities again; they are
recomputed chunk by chunk only when the head trains.

The peak is the forward's: one [chunk, V] fp32 block plus the [tokens, H] direction.
The default chunk (`default_chunk_size`) bounds chunk × V at 2²⁵ elements (128 MiB in
fp32), so the block is the same size whatever the vocabulary: 1024 rows at V = 32000,
256 at Llama-3's 128256, 128 at Gemma-3's 262144. Thinner blocks run the products
slower on the CPU (V = 128256: 64 rows take 1.5× the time of 256), and thicker ones
only grow memory with V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Elements of the [chunk, V] logits block the default chunk allows (128 MiB in fp32).
CHUNK_ELEMENTS = 2**25
MIN_CHUNK, MAX_CHUNK = 64, 4096

__all__ = [
    "IGNORE_INDEX",
    "count_tokens",
    "default_chunk_size",
    "mixed_token_logprobs",
    "plain_token_logprobs",
    "sequence_logprobs",
    "token_logprobs",
]


def default_chunk_size(vocab: int) -> int:
    """Rows per [chunk, V] block: chunk × V ≤ 2²⁵, a multiple of 64 in [64, 4096]."""
    rows = CHUNK_ELEMENTS // max(vocab, 1) // MIN_CHUNK * MIN_CHUNK
    return min(max(rows, MIN_CHUNK), MAX_CHUNK)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in fp32 at least (fp64 stays fp64 for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(
    out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, alpha: float = 1
) -> Tensor:
    """out = alpha · (hidden @ weightᵀ + bias), written into the reused chunk buffer."""
    if out.dtype == hidden.dtype:
        # Straight into the buffer: no [chunk, V] temporary, no fresh page faults.
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
        else:
            torch.addmm(bias, hidden, weight.t(), out=out)
    else:
        # bf16/fp16: the product in the input dtype, the softmax in fp32.
        out.copy_(F.linear(hidden, weight, bias))
    return out if alpha == 1 else out.mul_(alpha)


def _add_logits_(
    out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, alpha: float
) -> Tensor:
    """out += alpha · (hidden @ weightᵀ + bias)."""
    if out.dtype == hidden.dtype:
        out.addmm_(hidden, weight.t(), alpha=alpha)
        if bias is not None:
            out.add_(bias, alpha=alpha)
    else:
        out.add_(F.linear(hidden, weight, bias), alpha=alpha)
    return out


def _softmax_(z: Tensor) -> Tensor:
    """Turn logits into probabilities in place; return logsumexp (one [chunk, V])."""
    zmax = z.amax(dim=1, keepdim=True)
    z.sub_(zmax).exp_()
    total = z.sum(dim=1, keepdim=True)
    z.div_(total)
    return (zmax + total.log()).squeeze(1)


class _FusedTokenLogprobs(torch.autograd.Function):
    """log p(y_t) for rows of `hidden` that all carry a label; see the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logps = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        # W[y_t] − E_p[W]_t, the whole d log p / d h; hidden-sized, not vocab-sized.
        # Skipped under no_grad (reference and judging passes): half the work.
        hidden_grad = ctx.needs_input_grad[0]
        grad_dir = torch.empty_like(hidden) if hidden_grad else None
        buf = hidden.new_empty(min(chunk_size, n), vocab, dtype=acc)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            y = targets[rows, None]
            z = _logits_into(buf[: y.shape[0]], hidden[rows], weight, bias)
            target_logit = z.gather(1, y).squeeze(1)
            lse[rows] = _softmax_(z)
            logps[rows] = target_logit - lse[rows]
            if hidden_grad:
                # onehot − p is formed in fp32 BEFORE the product: for a confident
                # token (p_y ≈ 1), W[y] − E_p[W] would cancel badly afterwards.
                z.neg_().scatter_add_(1, y, torch.ones_like(y, dtype=acc))
                torch.mm(z.to(weight.dtype), weight, out=grad_dir[rows])
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(
            hidden if head_grad else None, weight, bias, targets, lse, grad_dir
        )
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse, grad_dir = ctx.saved_tensors
        g = grad_logps.to(lse.dtype)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_dir.to(g.dtype) * g[:, None]).to(grad_dir.dtype)
        if hidden is not None:
            grad_w, grad_b = _head_grads(
                hidden, weight, bias, targets, lse, g, ctx.chunk_size
            )
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None


def _head_grads(hidden, weight, bias, targets, lse, g, chunk_size):
    """dW = Σ_t g_t (onehot(y_t) − p_t)ᵀ h_t and db = Σ_t g_t (onehot(y_t) − p_t).

    p is recomputed chunk by chunk from the saved logsumexp; sums kept in fp32.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    grad_w = torch.zeros_like(weight, dtype=g.dtype)
    grad_b = None if bias is None else torch.zeros_like(bias, dtype=g.dtype)
    buf = hidden.new_empty(min(chunk_size, n), vocab, dtype=g.dtype)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        y = targets[rows, None]
        z = _logits_into(buf[: y.shape[0]], hidden[rows], weight, bias)
        z.sub_(lse[rows, None]).exp_().neg_()
        z.scatter_add_(1, y, torch.ones_like(y, dtype=z.dtype)).mul_(g[rows, None])
        grad_w.addmm_(z.t(), hidden[rows].to(z.dtype))
        if grad_b is not None:
            grad_b.add_(z.sum(dim=0))
    return grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype)


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    chunk_size: int,
    ignore_index: int,
    name: str = "hidden",
) -> Tensor:
    """Raise a clear ValueError for bad shapes or labels; return the label mask."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"{name} {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + [H]"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = labels != ignore_index
    targets = labels[mask]
    vocab = weight.shape[0]
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(
            f"label {bad} is outside [0, {vocab}) and is not ignore_index "
            f"({ignore_index})"
        )
    return mask


def _check_finite(logps: Tensor) -> None:
    if not torch.isfinite(logps).all():
        raise FloatingPointError(
            "NaN/inf log-probs appeared: the hidden states or the head weights hold "
            "non-finite values (diverged training, or fp16 overflow?)"
        )


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """log_softmax(hidden @ weightᵀ + bias)[labels], like labels, 0 where ignored.

    Differentiable w.r.t. hidden, weight and bias; never holds more than one
    [chunk_size, V] block of logits (None: `default_chunk_size(V)`). fp32 output
    (fp64 for fp64 inputs).
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    mask = _check_inputs(hidden, weight, labels, bias, chunk_size, ignore_index)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat_mask = mask.reshape(-1)
    # Only labelled rows reach the head: prompt tokens never cost a vocab product.
    index = flat_mask.nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).to(dtype)
    targets = labels.reshape(-1).index_select(0, index).long()
    logps = _FusedTokenLogprobs.apply(
        rows,
        weight.to(dtype),
        bias.to(dtype) if bias is not None else None,
        targets,
        chunk_size,
    )
    _check_finite(logps)
    out = logps.new_zeros(flat_mask.shape[0]).index_copy(0, index, logps)
    return out.view(labels.shape)


@torch.no_grad()
def mixed_token_logprobs(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    mix: float,
    ref_weight: Tensor | None = None,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Log-probs of labels under mix·z_policy + (1 − mix)·z_ref (SPA's DND: 1 + λ).

    No gradient; 0 where ignored; one [chunk_size, V] block of logits at a time.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    ref_weight = weight if ref_weight is None else ref_weight
    ref_bias = bias if ref_bias is None else ref_bias
    mask = _check_inputs(hidden, weight, labels, bias, chunk_size, ignore_index)
    _check_inputs(
        ref_hidden, ref_weight, labels, ref_bias, chunk_size, ignore_index, "ref_hidden"
    )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"policy and reference vocabularies differ: {weight.shape[0]} vs "
            f"{ref_weight.shape[0]}"
        )
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    ref_dtype = torch.promote_types(ref_hidden.dtype, ref_weight.dtype)
    weight, ref_weight = weight.to(dtype), ref_weight.to(ref_dtype)
    bias = bias.to(dtype) if bias is not None else None
    ref_bias = ref_bias.to(ref_dtype) if ref_bias is not None else None
    flat_mask = mask.reshape(-1)
    index = flat_mask.nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).to(dtype)
    ref_rows = ref_hidden.reshape(-1, ref_hidden.shape[-1]).index_select(0, index)
    ref_rows = ref_rows.to(ref_dtype)
    targets = labels.reshape(-1).index_select(0, index).long()
    n = rows.shape[0]
    acc = _acc_dtype(torch.promote_types(dtype, ref_dtype))
    logps = rows.new_empty(n, dtype=acc)
    buf = rows.new_empty(min(chunk_size, n), weight.shape[0], dtype=acc)
    for start in range(0, n, chunk_size):
        span = slice(start, start + chunk_size)
        y = targets[span, None]
        z = _logits_into(buf[: y.shape[0]], rows[span], weight, bias, alpha=mix)
        _add_logits_(z, ref_rows[span], ref_weight, ref_bias, alpha=1 - mix)
        target_logit = z.gather(1, y).squeeze(1)
        logps[span] = target_logit - _softmax_(z)
    _check_finite(logps)
    out = logps.new_zeros(flat_mask.shape[0]).index_copy(0, index, logps)
    return out.view(labels.shape)


def plain_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Reference: full logits → log_softmax → gather (materialises [..., V])."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(_acc_dtype(logits.dtype))
    mask = labels != ignore_index
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])
    return logps.squeeze(-1) * mask


def count_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of labelled positions per row (sum over the last dim)."""
    return (labels != ignore_index).sum(-1)


def sequence_logprobs(
    token_lp: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Σ_t log p(y_t) over labelled positions of each row (the mean if `average`)."""
    mask = labels != ignore_index
    total = (token_lp * mask).sum(-1)
    if average:
        return total / count_tokens(labels, ignore_index).clamp(min=1)
    return total
