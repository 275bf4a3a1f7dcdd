"""Per-pair preference losses on sequence log-probs, and SPA's confidence threshold.

Every loss is a function of the DPO margin

    h = [logp_θ(y_w) − logp_ref(y_w)] − [logp_θ(y_l) − logp_ref(y_l)]

(formulas as in TRL's DPOTrainer where TRL has them; SPA's as in
docs/methods.md#spa-self-refinement).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "soft", "spa")

__all__ = ["LOSS_TYPES", "MarginWindow", "implicit_rewards", "preference_loss"]


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    target_prob: Tensor | None = None,
    confident: Tensor | None = None,
    alpha: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """Loss of each pair, shape [B] (reduce it yourself)."""
    shape = policy_chosen_logps.shape
    _check_scalars(loss_type, beta, label_smoothing, alpha)
    _check_shapes(
        shape,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        target_prob=target_prob,
        confident=confident,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing

    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023
        return -F.logsigmoid(beta * h)
    if loss_type == "cdpo":  # conservative DPO, Mitchell 2023
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":  # rDPO, Chowdhury et al. 2024: unbiased under flips
        clean = -(1 - eps) * F.logsigmoid(beta * h)
        flipped = -eps * F.logsigmoid(-beta * h)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "ipo":  # IPO, Azar et al. 2023, Eq. 17; length-averaged as TRL
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "loss_type 'ipo' needs chosen_lengths and rejected_lengths (response "
                "token counts): its log-ratios are averaged per token"
            )
        chosen_avg = chosen_ratio / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_ratio / rejected_lengths.clamp(min=1)
        return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC, Zhao et al. 2023
        return torch.relu(1 - beta * h)
    if loss_type == "soft":  # cross-entropy against a soft label p(y_w ≻ y_l)
        if target_prob is None:
            raise ValueError("loss_type 'soft' needs target_prob (values in [0, 1])")
        if ((target_prob < 0) | (target_prob > 1)).any():
            raise ValueError("target_prob must lie in [0, 1]")
        p = target_prob.to(h.dtype)
        return -p * F.logsigmoid(beta * h) - (1 - p) * F.logsigmoid(-beta * h)
    # SPA self-refinement, Kim et al. 2025: plain DPO on confident pairs,
    # cDPO-style smoothing of strength α on the rest.
    if confident is None:
        raise ValueError(
            "loss_type 'spa' needs confident (bool per pair: beta * m_g > tau)"
        )
    # Weight on the chosen side: 1 where confident, 1 − α where not.
    w = 1 - alpha + alpha * confident.to(h.dtype)
    return -w * F.logsigmoid(beta * h) - (1 - w) * F.logsigmoid(-beta * h)


def _check_scalars(loss_type: str, beta: float, eps: float, alpha: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {eps}")
    if not 0 <= alpha <= 0.5:
        raise ValueError(f"alpha must lie in [0, 0.5], got {alpha}")


def _check_shapes(shape: torch.Size, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; policy_chosen_logps has "
                f"{tuple(shape)} (one value per pair)"
            )


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward β·(logp_θ − logp_ref), detached (for metrics, judging)."""
    return (beta * (policy_logps - ref_logps)).detach()


class MarginWindow:
    """Per-sample margins β·m_g of the last `window` micro-batches, for SPA's τ.

    Unlike the official code (a window of per-batch MEANS, per device), every
    sample's margin is kept and margins are gathered across processes, so τ is a
    true per-sample quantile at any batch size and world size.
    """

    def __init__(self, window: int = 50):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.batches: deque[Tensor] = deque(maxlen=window)

    def update(self, margins: Tensor) -> None:
        """Add one micro-batch of margins (from every process when distributed)."""
        margins = margins.detach().reshape(-1).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            margins = _all_gather_uneven(margins)
        self.batches.append(margins.cpu())

    def __len__(self) -> int:
        return sum(b.numel() for b in self.batches)

    def threshold(self, quantile: float) -> float:
        """τ: the least confident `quantile` fraction of kept margins lie below it."""
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
        if not len(self):
            raise ValueError("no margins yet: call update() first")
        return torch.quantile(torch.cat(list(self.batches)), quantile).item()


def _all_gather_uneven(values: Tensor) -> Tensor:
    """Concatenate 1-D tensors of different lengths from all ranks (rank order)."""
    if dist.get_backend() == "nccl":
        values = values.to(torch.device("cuda", torch.cuda.current_device()))
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    # all_gather needs equal shapes: pad to the longest, trim after.
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes, strict=True)])
