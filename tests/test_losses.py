"""Each preference loss equals its formula; SPA's margin window is a true quantile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from axolotl_prefalign.core.losses import (
    LOSS_TYPES,
    MarginWindow,
    implicit_rewards,
    preference_loss,
)

BETA = 0.3


def logps(n=16, seed=0):
    """Random sequence log-probs of a batch: policy/ref × chosen/rejected."""
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=gen, dtype=torch.float64) * 40 for _ in range(4)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def per_pair(fn, pc, pr, rc, rr, *extra):
    """Apply a scalar formula pair by pair (independent of the vectorised code)."""
    return torch.tensor(
        [
            fn(float(a - c) - float(b - d), *(float(e[i]) for e in extra))
            for i, (a, b, c, d) in enumerate(zip(pc, pr, rc, rr, strict=True))
        ],
        dtype=torch.float64,
    )


def test_sigmoid_is_dpo():
    inputs = logps()
    got = preference_loss(*inputs, loss_type="sigmoid", beta=BETA)
    assert got.shape == (16,)
    want = per_pair(lambda h: -log_sigmoid(BETA * h), *inputs)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_smooths_labels(eps):
    inputs = logps()
    got = preference_loss(*inputs, loss_type="cdpo", beta=BETA, label_smoothing=eps)
    want = per_pair(
        lambda h: -(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h),
        *inputs,
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.45])
def test_robust_is_rdpo(eps):
    inputs = logps()
    got = preference_loss(*inputs, loss_type="robust", beta=BETA, label_smoothing=eps)
    want = per_pair(
        lambda h: (
            (-(1 - eps) * log_sigmoid(BETA * h) + eps * log_sigmoid(-BETA * h))
            / (1 - 2 * eps)
        ),
        *inputs,
    )
    torch.testing.assert_close(got, want)


def test_ipo_averages_log_ratios_per_token():
    pc, pr, rc, rr = logps()
    len_c = torch.randint(1, 50, (16,))
    len_r = torch.randint(1, 50, (16,))
    got = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type="ipo",
        beta=BETA,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
    )
    want = torch.tensor(
        [
            ((pc[i] - rc[i]) / len_c[i] - (pr[i] - rr[i]) / len_r[i] - 1 / (2 * BETA))
            ** 2
            for i in range(16)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want)


def test_hinge_is_slic():
    inputs = logps()
    got = preference_loss(*inputs, loss_type="hinge", beta=BETA)
    torch.testing.assert_close(got, per_pair(lambda h: max(0, 1 - BETA * h), *inputs))


def test_soft_is_cross_entropy_against_target_prob():
    inputs = logps()
    target = torch.rand(16, dtype=torch.float64)
    got = preference_loss(*inputs, loss_type="soft", beta=BETA, target_prob=target)
    want = per_pair(
        lambda h, p: -p * log_sigmoid(BETA * h) - (1 - p) * log_sigmoid(-BETA * h),
        *inputs,
        target,
    )
    torch.testing.assert_close(got, want)
    hard = preference_loss(
        *inputs, loss_type="soft", beta=BETA, target_prob=torch.ones(16)
    )
    torch.testing.assert_close(
        hard, preference_loss(*inputs, loss_type="sigmoid", beta=BETA)
    )


def test_spa_smooths_only_the_unconfident_pairs():
    inputs = logps()
    confident = torch.arange(16) % 3 != 0  # a mixed batch
    alpha = 0.1
    got = preference_loss(
        *inputs, loss_type="spa", beta=BETA, confident=confident, alpha=alpha
    )

    def spa(h, c):
        return -(1 - alpha + alpha * c) * log_sigmoid(BETA * h) - (
            alpha - alpha * c
        ) * log_sigmoid(-BETA * h)

    torch.testing.assert_close(got, per_pair(spa, *inputs, confident))
    dpo = preference_loss(*inputs, loss_type="sigmoid", beta=BETA)
    cdpo = preference_loss(*inputs, loss_type="cdpo", beta=BETA, label_smoothing=alpha)
    torch.testing.assert_close(got[confident], dpo[confident])
    torch.testing.assert_close(got[~confident], cdpo[~confident])


def test_spa_with_alpha_zero_is_dpo():
    inputs = logps()
    confident = torch.rand(16) > 0.5
    got = preference_loss(
        *inputs, loss_type="spa", beta=BETA, confident=confident, alpha=0.0
    )
    torch.testing.assert_close(
        got, preference_loss(*inputs, loss_type="sigmoid", beta=BETA)
    )


def test_losses_are_stable_for_huge_margins():
    pc, pr, rc, rr = (torch.tensor([x], dtype=torch.float32) for x in (0, -1e4, 0, 0))
    for loss_type in ("sigmoid", "cdpo", "robust", "soft", "spa"):
        out = preference_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=loss_type,
            beta=1.0,
            label_smoothing=0.1,
            target_prob=torch.tensor([0.9]),
            confident=torch.tensor([False]),
        )
        assert torch.isfinite(out).all(), loss_type


def test_gradients_flow_to_policy_logps():
    pc, pr, rc, rr = logps()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=BETA).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_implicit_rewards_are_detached_scaled_log_ratios():
    pol = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0])
    r = implicit_rewards(pol, ref, 0.1)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([0.1, -0.1]))


def test_loss_types_are_listed():
    assert LOSS_TYPES == ("sigmoid", "cdpo", "robust", "ipo", "hinge", "soft", "spa")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="kto"), r"unknown loss_type 'kto'; valid: sigmoid, cdpo"),
        (dict(beta=0.0), r"beta must be > 0"),
        (dict(beta=-1.0), r"beta must be > 0"),
        (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\), got 0.5"),
        (dict(loss_type="cdpo", label_smoothing=-0.1), r"label_smoothing must lie"),
        (dict(loss_type="spa", alpha=0.6), r"alpha must lie in \[0, 0.5\]"),
        (dict(loss_type="spa", alpha=-0.1), r"alpha must lie"),
        (dict(loss_type="spa"), r"'spa' needs confident"),
        (dict(loss_type="soft"), r"'soft' needs target_prob"),
        (dict(loss_type="soft", target_prob=torch.full((4,), 1.5)), r"in \[0, 1\]"),
        (dict(loss_type="soft", target_prob=torch.full((4,), -0.1)), r"in \[0, 1\]"),
        (dict(loss_type="ipo"), r"'ipo' needs chosen_lengths and rejected_lengths"),
        (
            dict(loss_type="ipo", chosen_lengths=torch.ones(4)),
            r"'ipo' needs chosen_lengths and rejected_lengths",
        ),
        (
            dict(loss_type="spa", confident=torch.ones(3, dtype=torch.bool)),
            r"confident has shape \(3,\); policy_chosen_logps has \(4,\)",
        ),
        (
            dict(ref_rejected_logps=torch.zeros(4, 2)),
            r"ref_rejected_logps has shape \(4, 2\)",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(
        policy_chosen_logps=torch.zeros(4),
        policy_rejected_logps=torch.zeros(4),
        ref_chosen_logps=torch.zeros(4),
        ref_rejected_logps=torch.zeros(4),
        loss_type="sigmoid",
        beta=0.1,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        preference_loss(**args)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_margin_window_threshold_is_quantile_of_last_batches(batch_size):
    window = MarginWindow(window=5)
    batches = [torch.randn(batch_size) for _ in range(12)]
    for i, batch in enumerate(batches, start=1):
        window.update(batch)
        kept = torch.cat(batches[max(0, i - 5) : i])
        assert len(window) == kept.numel()
        for q in (0.1, 0.5):
            assert window.threshold(q) == pytest.approx(torch.quantile(kept, q).item())


def test_margin_window_evicts_oldest_batch():
    window = MarginWindow(window=2)
    window.update(torch.tensor([-100.0, -90.0]))
    window.update(torch.tensor([1.0, 2.0]))
    assert window.threshold(0.0) == -100.0
    window.update(torch.tensor([3.0]))
    assert window.threshold(0.0) == 1.0
    assert len(window) == 3


def test_margin_window_errors():
    with pytest.raises(ValueError, match="window must be >= 1"):
        MarginWindow(window=0)
    with pytest.raises(ValueError, match="no margins yet"):
        MarginWindow().threshold(0.1)
    window = MarginWindow()
    window.update(torch.zeros(2))
    with pytest.raises(ValueError, match=r"quantile must lie in \[0, 1\]"):
        window.threshold(1.5)


# Rank r's micro-batches: different sizes per rank and per step (0 included).
RANK_BATCH_SIZES = {0: [3, 1, 5, 2], 1: [2, 4, 0, 6]}


def rank_margins(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, generator=gen) for n in RANK_BATCH_SIZES[rank]]


def _window_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        window = MarginWindow(window=3)
        taus = []
        for margins in rank_margins(rank):
            window.update(margins)
            taus.append(window.threshold(0.1))
        torch.save(taus, f"{out_dir}/taus{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_margin_window_gathers_uneven_batches_across_processes(tmp_path):
    mp.spawn(
        _window_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    per_step = [
        torch.cat(step) for step in zip(rank_margins(0), rank_margins(1), strict=True)
    ]
    want = [
        torch.quantile(torch.cat(per_step[max(0, i - 2) : i + 1]), 0.1).item()
        for i in range(len(per_step))
    ]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"taus{rank}.pt")
        assert got == pytest.approx(want)
