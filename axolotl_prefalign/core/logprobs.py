"""Per-token log-probs of target tokens through the LM head, chunk by chunk.

    log p(y_t) = z_t[y_t] − logsumexp(z_t),        z_t = W h_t + b

The plain path builds z for every position ([tokens, V]: 2.1 GB in fp32 for one Llama-3
pair of 2×2048 tokens) and autograd keeps several tensors of that size. Here only the
positions that carry a label reach the head, a chunk of rows at a time, and the
gradient w.r.t. h is formed in the forward pass (docs/methods.md#logprob-path):

    d log p(y_t) / d h_t = W[y_t] − Σ_v p_tv W[v] = (onehot(y_t) − p_t) W

one [chunk, V] × [V, H] product beside the logits, kept as a [tokens, H] tensor, so
the backward needs no second pass over the vocabulary (two vocabulary-sized products
per step; a backward that recomputes the logits needs three). The weight gradient
Σ_t g_t (onehot(y_t) − p_t)ᵀ h_t needs the probabilities again; they are recomputed
chunk by chunk only when the head trains.

Every pass goes over the vocabulary through one loop, `_logit_tiles`, which yields
[chunk, tile] blocks of logits (the untiled case is one tile of all V):

- the forward (frozen or training head) and SPA's DND mixture (two heads' logits,
  weighted) keep an online log-sum-exp over the tiles (`_online_logprobs`), with
  E_p[W] accumulated as Σ_{v≠y} e^{z_v−m} W[v] and rescaled as the running max m grows;
- the backward of a training head recomputes p tile by tile from the saved
  log-sum-exp (`_head_grads`).

The peak is the forward's: one logits block plus the [tokens, H] direction. On the CPU
the vocabulary is tiled (`default_vocab_tile`: blocks of TILED_CHUNK = 512 rows ×
VOCAB_TILE = 2048 columns, 4 MiB in fp32), so memory does not grow with V and the
products keep 512 rows. On CUDA (not yet measured tiled) the block is all of V and
its rows come from `default_chunk_size`, which bounds chunk × V at 2²⁵ elements
(128 MiB in fp32): 1024 rows at V = 32000, 256 at Llama-3's 128256, 128 at Gemma-3's
262144. Thin row blocks run the products slower on the CPU (V = 128256: 64 rows take
1.5× the time of 256), which is why the CPU tiles columns instead of shrinking rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

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


class _Head(NamedTuple):
    """One weighted head's share α · (h Wᵀ + b) of the logits; `hidden` is [N, H]."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    alpha: float = 1.0

    def rows(self, index: Tensor) -> _Head:
        """This head on the rows `index` of its states, cast to its dtype."""
        return self._replace(
            hidden=self.hidden.index_select(0, index).to(self.weight.dtype)
        )


def _block(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous [rows, cols] view of the flat block buffer."""
    return buf[: rows * cols].view(rows, cols)


def _logit_tiles(
    heads: Sequence[_Head], tile: int, buf: Tensor
) -> Iterator[tuple[int, int, Tensor]]:
    """(v0, v1, z) per vocabulary tile, z = Σ_heads α · (h W[v0:v1]ᵀ + b[v0:v1]).

    The one loop over the vocabulary. z lives in `buf` and is overwritten by the
    next tile, so it must be used before the loop moves on.
    """
    rows, vocab = heads[0].hidden.shape[0], heads[0].weight.shape[0]
    for v0 in range(0, vocab, tile):
        v1 = min(v0 + tile, vocab)
        z = _block(buf, rows, v1 - v0)
        for i, head in enumerate(heads):
            w, b = head.weight[v0:v1], None if head.bias is None else head.bias[v0:v1]
            if i == 0:
                _logits_into(z, head.hidden, w, b, head.alpha)
            else:
                _add_logits_(z, head.hidden, w, b, head.alpha)
        yield v0, v1, z


def _target_column(y: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(whether y_t lies in [v0, v1), its column there clamped into the tile).

    A mask rather than `nonzero()`: no host sync on CUDA, and rows outside the tile
    read a harmless column that `torch.where` then discards.
    """
    inside = (y >= v0) & (y < v1)
    return inside, (y - v0).clamp_(0, v1 - v0 - 1)[:, None]


def _online_logprobs(
    heads: Sequence[_Head], y: Tensor, tile: int, buf: Tensor, grad_dir: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(log p(y), logsumexp) of one row chunk over the tiles of `_logit_tiles`.

    An online log-sum-exp (running max m, rescaled sums), as in flash attention.
    With `grad_dir` (one head only; written in place) it also accumulates
    a = Σ_{v≠y} e^{z_v−m} W[v] and s = Σ_{v≠y} e^{z_v−m}, both WITHOUT the target,
    so that

        W[y] − E_p[W] = (s · W[y] − a) / (s + e^{z_y−m})

    is formed from the other tokens' mass directly: for a confident token (p_y ≈ 1)
    the difference of two nearly equal vectors never appears.
    """
    rows, acc = y.shape[0], buf.dtype
    m = buf.new_full((rows,), -torch.inf)
    s, e_y, z_y = (buf.new_zeros(rows) for _ in range(3))
    weight = heads[0].weight
    a = None if grad_dir is None else buf.new_zeros(rows, weight.shape[1])
    for v0, v1, z in _logit_tiles(heads, tile, buf):
        inside, col = _target_column(y, v0, v1)
        z_y = torch.where(inside, z.gather(1, col).squeeze(1), z_y)
        m_new = torch.maximum(m, z.amax(dim=1))
        scale = (m - m_new).exp_()  # 0 on the first tile (m = −inf)
        z.sub_(m_new[:, None]).exp_()
        e_tile = z.gather(1, col).squeeze(1)
        e_y = torch.where(inside, e_tile, e_y * scale)
        # The target's own mass is kept apart (e_y), out of s and a.
        z.scatter_(1, col, torch.where(inside, 0, e_tile)[:, None])
        s = s.mul_(scale).add_(z.sum(dim=1))
        if a is not None:
            w = weight[v0:v1]
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


def _logprobs(
    heads: Sequence[_Head],
    index: Tensor,
    targets: Tensor,
    chunk_size: int,
    tile: int,
    grad_dir: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p, logsumexp) at the rows `index` of the heads' flat [N, H] states, a row
    chunk at a time: no [labelled, H] copy of the hidden states."""
    n, vocab = index.shape[0], heads[0].weight.shape[0]
    acc = _acc_dtype(
        functools.reduce(torch.promote_types, (h.weight.dtype for h in heads))
    )
    # Made from the hidden states (not the index) so that they follow them: same
    # device, and fake where they are fake (benchmarks/memory_predict.py).
    like = heads[0].hidden
    logps = like.new_empty(n, dtype=acc)
    lse = like.new_empty(n, dtype=acc)
    buf = like.new_empty(min(chunk_size, n) * min(tile, vocab), dtype=acc)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = [head.rows(index[rows]) for head in heads]
        out = None if grad_dir is None else grad_dir[rows]
        logps[rows], lse[rows] = _online_logprobs(chunk, targets[rows], tile, buf, out)
    return logps, lse


class _FusedTokenLogprobs(torch.autograd.Function):
    """log p(y_t) at the labelled rows `index` of the flat [N, H] `hidden`, whose
    `targets` they are; see the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, chunk_size, tile):
        # W[y_t] − E_p[W]_t, the whole d log p / d h; hidden-sized, not vocab-sized.
        # Skipped under no_grad (reference and judging passes): half the work.
        grad_dir = None
        if ctx.needs_input_grad[0]:
            grad_dir = hidden.new_empty(
                index.shape[0], hidden.shape[1], dtype=weight.dtype
            )
        heads = [_Head(hidden, weight, bias)]
        logps, lse = _logprobs(heads, index, targets, chunk_size, tile, grad_dir)
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.chunk_size, ctx.tile = chunk_size, tile
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        # The head is kept for the backward only when it trains (a sharded head's
        # saved weight is gathered again there: core/heads.py).
        saved = (hidden, weight, bias) if head_grad else (None, None, None)
        ctx.save_for_backward(*saved, index, targets, lse, grad_dir)
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
                _Head(hidden, weight, bias),
                index,
                targets,
                lse,
                g,
                ctx.chunk_size,
                ctx.tile,
            )
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _head_grads(
    head: _Head,
    index: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    chunk_size: int,
    tile: int,
) -> tuple[Tensor, Tensor | None]:
    """dW = Σ_t g_t (onehot(y_t) − p_t)ᵀ h_t and db = Σ_t g_t (onehot(y_t) − p_t).

    p is recomputed block by block ([chunk, tile]) from the saved logsumexp; sums
    kept in fp32.
    """
    weight, bias = head.weight, head.bias
    n, vocab = index.shape[0], weight.shape[0]
    grad_w = torch.zeros_like(weight, dtype=g.dtype)
    grad_b = None if bias is None else torch.zeros_like(bias, dtype=g.dtype)
    buf = g.new_empty(min(chunk_size, n) * min(tile, vocab))
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = head.rows(index[rows])
        h, y = chunk.hidden.to(g.dtype), targets[rows]
        for v0, v1, z in _logit_tiles([chunk], tile, buf):
            z.sub_(lse[rows, None]).exp_().neg_()
            inside, col = _target_column(y, v0, v1)
            z.scatter_add_(1, col, inside.to(z.dtype)[:, None])
            z.mul_(g[rows, None])
            grad_w[v0:v1].addmm_(z.t(), h)
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
    vocab_tile: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Log-probs of labels under mix·z_policy + (1 − mix)·z_ref (SPA's DND: 1 + λ).

    No gradient; 0 where ignored; one [chunk_size, vocab_tile] block of logits at a
    time, with the defaults of `token_logprobs`.
    """
    chunk_size, tile = block_shape(
        weight.shape[0], weight.device, chunk_size, vocab_tile
    )
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
    heads = [
        _cast_head(hidden, weight, bias, mix),
        _cast_head(ref_hidden, ref_weight, ref_bias, 1 - mix),
    ]
    flat_mask = mask.reshape(-1)
    index = flat_mask.nonzero().squeeze(1)
    targets = labels.reshape(-1).index_select(0, index).long()
    logps, _ = _logprobs(heads, index, targets, chunk_size, tile)
    _check_finite(logps)
    out = logps.new_zeros(flat_mask.shape[0]).index_copy(0, index, logps)
    return out.view(labels.shape)


def _cast_head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, alpha: float
) -> _Head:
    """A head on the flattened `hidden`, in the promoted dtype of states and weight."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    cast_bias = None if bias is None else bias.to(dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _Head(flat, weight.to(dtype), cast_bias, alpha)


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
