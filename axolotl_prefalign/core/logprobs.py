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

The peak is the forward's: one logits block plus the [tokens, H] direction. On the CPU
the vocabulary is tiled too (`default_vocab_tile`: blocks of TILED_CHUNK = 512 rows ×
VOCAB_TILE = 2048 columns, 4 MiB in fp32): an online log-sum-exp over the tiles, with
E_p[W] accumulated as Σ_{v≠y} e^{z_v−m} W[v] and rescaled as the running max m grows
(`_tiled_chunk`), so memory does not grow with V and the products keep 512 rows. On
CUDA (not yet measured tiled) the block is all of V and its rows come from
`default_chunk_size`, which bounds chunk × V at 2²⁵ elements (128 MiB in fp32): 1024
rows at V = 32000, 256 at Llama-3's 128256, 128 at Gemma-3's 262144. Thin row blocks
run the products slower on the CPU (V = 128256: 64 rows take 1.5× the time of 256),
which is why the CPU tiles columns instead of shrinking rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Elements of the [chunk, V] logits block the default chunk allows (128 MiB in fp32).
CHUNK_ELEMENTS = 2**25
MIN_CHUNK, MAX_CHUNK = 64, 4096
# The vocabulary tiling on the CPU: [TILED_CHUNK, VOCAB_TILE] logits blocks (4 MiB in
# fp32) with an online log-sum-exp, so memory no longer grows with V while the
# products keep 512 rows (thin row chunks run the products slower on the CPU).
VOCAB_TILE, TILED_CHUNK = 2048, 512

__all__ = [
    "IGNORE_INDEX",
    "block_shape",
    "count_tokens",
    "default_chunk_size",
    "default_vocab_tile",
    "mixed_token_logprobs",
    "plain_token_logprobs",
    "sequence_logprobs",
    "token_logprobs",
]


def default_chunk_size(vocab: int) -> int:
    """Rows per [chunk, V] block: chunk × V ≤ 2²⁵, a multiple of 64 in [64, 4096]."""
    rows = CHUNK_ELEMENTS // max(vocab, 1) // MIN_CHUNK * MIN_CHUNK
    return min(max(rows, MIN_CHUNK), MAX_CHUNK)


def default_vocab_tile(vocab: int, device: torch.device | str) -> int:
    """Vocabulary columns per logits block: VOCAB_TILE on the CPU, the whole V on
    CUDA and other devices (not yet measured there), never more than V."""
    if torch.device(device).type == "cpu":
        return min(VOCAB_TILE, vocab)
    return vocab


def block_shape(
    vocab: int, device: torch.device, chunk_size: int | None, vocab_tile: int | None
) -> tuple[int, int]:
    """(rows, columns) of the logits block from the settings (None: defaults)."""
    if vocab_tile is not None and vocab_tile < 1:
        raise ValueError(f"vocab_tile must be >= 1, got {vocab_tile}")
    tile = min(vocab_tile or default_vocab_tile(vocab, device), vocab)
    if chunk_size is None:
        chunk_size = TILED_CHUNK if tile < vocab else default_chunk_size(vocab)
    return chunk_size, tile


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
    """log p(y_t) at the labelled rows `index` of the flat [N, H] `hidden`, whose
    `targets` they are; see the module doc. The rows are gathered a chunk at a time
    (and cast to the head's dtype there): no [labelled, H] copy of the hidden states."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, chunk_size, tile):
        n, vocab, dtype = index.shape[0], weight.shape[0], weight.dtype
        acc = _acc_dtype(dtype)
        logps = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        # W[y_t] − E_p[W]_t, the whole d log p / d h; hidden-sized, not vocab-sized.
        # Skipped under no_grad (reference and judging passes): half the work.
        hidden_grad = ctx.needs_input_grad[0]
        grad_dir = (
            hidden.new_empty(n, hidden.shape[1], dtype=dtype) if hidden_grad else None
        )
        buf = hidden.new_empty(min(chunk_size, n) * min(tile, vocab), dtype=acc)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden.index_select(0, index[rows]).to(dtype)
            y = targets[rows, None]
            if tile < vocab:
                out = grad_dir[rows] if hidden_grad else None
                logps[rows], lse[rows] = _tiled_chunk(
                    h, weight, bias, y.squeeze(1), tile, buf, out
                )
                continue
            z = _logits_into(_block(buf, y.shape[0], vocab), h, weight, bias)
            target_logit = z.gather(1, y).squeeze(1)
            lse[rows] = _softmax_(z)
            logps[rows] = target_logit - lse[rows]
            if hidden_grad:
                # onehot − p is formed in fp32 BEFORE the product: for a confident
                # token (p_y ≈ 1), W[y] − E_p[W] would cancel badly afterwards.
                z.neg_().scatter_add_(1, y, torch.ones_like(y, dtype=acc))
                torch.mm(z.to(dtype), weight, out=grad_dir[rows])
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.chunk_size, ctx.tile = chunk_size, tile
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        # The head is kept for the backward only when it trains (a sharded head's
        # saved weight is gathered again there: core/heads.py).
        head = (hidden, weight, bias) if head_grad else (None, None, None)
        ctx.save_for_backward(*head, index, targets, lse, grad_dir)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, index, targets, lse, grad_dir = ctx.saved_tensors
        g = grad_logps.to(lse.dtype)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Scattered chunk by chunk: no [labelled, H] temporary beside the result.
            grad_h = g.new_zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype)
            for start in range(0, index.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                part = grad_dir[rows].to(g.dtype) * g[rows, None]
                grad_h.index_copy_(0, index[rows], part.to(grad_h.dtype))
        if hidden is not None:
            grad_w, grad_b = _head_grads(
                hidden, index, weight, bias, targets, lse, g, ctx.chunk_size, ctx.tile
            )
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _block(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous [rows, cols] view of the flat block buffer."""
    return buf[: rows * cols].view(rows, cols)


def _tiled_chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    tile: int,
    buf: Tensor,
    grad_dir: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(log p(y), logsumexp) of one row chunk, the vocabulary `tile` columns at a time.

    An online log-sum-exp over the tiles (running max m, rescaled sums), as in
    flash attention. With `grad_dir` (written in place) it also accumulates
    a = Σ_{v≠y} e^{z_v−m} W[v] and s = Σ_{v≠y} e^{z_v−m}, both WITHOUT the target,
    so that

        W[y] − E_p[W] = (s · W[y] − a) / (s + e^{z_y−m})

    is formed from the other tokens' mass directly: for a confident token (p_y ≈ 1)
    the difference of two nearly equal vectors never appears.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = buf.dtype
    m = hidden.new_full((rows,), -torch.inf, dtype=acc)
    s = hidden.new_zeros(rows, dtype=acc)
    e_y = hidden.new_zeros(rows, dtype=acc)
    z_y = hidden.new_zeros(rows, dtype=acc)
    a = (
        hidden.new_zeros(rows, hidden.shape[1], dtype=acc)
        if grad_dir is not None
        else None
    )
    for v0 in range(0, vocab, tile):
        v1 = min(v0 + tile, vocab)
        w = weight[v0:v1]
        z = _logits_into(
            _block(buf, rows, v1 - v0), hidden, w, None if bias is None else bias[v0:v1]
        )
        here = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
        cols = y[here] - v0
        z_y[here] = z[here, cols]
        m_new = torch.maximum(m, z.amax(dim=1))
        scale = (m - m_new).exp_()  # 0 on the first tile (m = −inf)
        z.sub_(m_new[:, None]).exp_()
        s.mul_(scale)
        e_y.mul_(scale)
        e_y[here] = z[here, cols]
        z[here, cols] = 0
        s.add_(z.sum(dim=1))
        if a is not None:
            a.mul_(scale[:, None])
            if w.dtype == acc:
                a.addmm_(z, w)
            else:
                a.add_(torch.mm(z.to(w.dtype), w))
        m = m_new
    total = s + e_y
    lse = m + total.log()
    if grad_dir is not None:
        w_y = weight.index_select(0, y).to(acc)
        grad_dir.copy_((w_y.mul_(s[:, None]).sub_(a)).div_(total[:, None]))
    return z_y - lse, lse


def _head_grads(hidden, index, weight, bias, targets, lse, g, chunk_size, tile):
    """dW = Σ_t g_t (onehot(y_t) − p_t)ᵀ h_t and db = Σ_t g_t (onehot(y_t) − p_t).

    p is recomputed block by block ([chunk, tile]) from the saved logsumexp; sums
    kept in fp32.
    """
    n, vocab = index.shape[0], weight.shape[0]
    grad_w = torch.zeros_like(weight, dtype=g.dtype)
    grad_b = None if bias is None else torch.zeros_like(bias, dtype=g.dtype)
    buf = hidden.new_empty(min(chunk_size, n) * min(tile, vocab), dtype=g.dtype)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        h, y = hidden.index_select(0, index[rows]).to(weight.dtype), targets[rows]
        for v0 in range(0, vocab, tile):
            v1 = min(v0 + tile, vocab)
            b = None if bias is None else bias[v0:v1]
            z = _logits_into(_block(buf, h.shape[0], v1 - v0), h, weight[v0:v1], b)
            z.sub_(lse[rows, None]).exp_().neg_()
            here = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
            z[here, y[here] - v0] += 1
            z.mul_(g[rows, None])
            grad_w[v0:v1].addmm_(z.t(), h.to(z.dtype))
            if grad_b is not None:
                grad_b[v0:v1].add_(z.sum(dim=0))
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
    vocab_tile: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """log_softmax(hidden @ weightᵀ + bias)[labels], like labels, 0 where ignored.

    Differentiable w.r.t. hidden, weight and bias; never holds more than one
    [chunk_size, vocab_tile] block of logits. Defaults: `default_vocab_tile` (2048
    columns on the CPU, all of V on CUDA); rows TILED_CHUNK when the vocabulary is
    tiled, else `default_chunk_size(V)`. fp32 output (fp64 for fp64 inputs).
    """
    chunk_size, tile = block_shape(
        weight.shape[0], weight.device, chunk_size, vocab_tile
    )
    mask = _check_inputs(hidden, weight, labels, bias, chunk_size, ignore_index)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat_mask = mask.reshape(-1)
    # Only labelled rows reach the head: prompt tokens never cost a vocab product.
    index = flat_mask.nonzero().squeeze(1)
    targets = labels.reshape(-1).index_select(0, index).long()
    flat = hidden.reshape(-1, hidden.shape[-1])
    if not torch.is_grad_enabled():
        # Under no_grad, needs_input_grad would still see hidden's requires_grad.
        flat, weight = flat.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    logps = _FusedTokenLogprobs.apply(
        flat,
        weight.to(dtype),
        bias.to(dtype) if bias is not None else None,
        index,
        targets,
        chunk_size,
        tile,
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
