"""The fused log-prob path equals full logits → log_softmax → gather, in a chunk."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from axolotl_prefalign.core.logprobs import (
    count_tokens,
    mixed_token_logprobs,
    plain_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)


def make_case(b, t, h, v, *, dtype=torch.float32, bias=True, seed=0):
    """Random inputs; labels with a prompt, scattered -100s and one ignored row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype) / h**0.5
    bias_t = torch.randn(v, generator=gen, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.3] = -100
    labels[:, : t // 3] = -100  # a prompt
    if b > 1:
        labels[-1] = -100
    return hidden, weight, bias_t, labels


def grads(fn, hidden, weight, bias, labels, seed=1):
    """Values and d(Σ g·lp)/d(hidden, weight, bias) for a random upstream g."""
    leaves = [x for x in (hidden, weight, bias) if x is not None and x.requires_grad]
    out = fn(hidden, weight, labels, bias)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad((out * g.to(out.dtype)).sum(), leaves)


def fused(chunk_size):
    return lambda h, w, y, b: token_logprobs(h, w, y, bias=b, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    ("shape", "chunk_size"),
    [
        ((2, 9, 16, 37), 1),
        ((2, 9, 16, 37), 4),  # does not divide the labelled count
        ((3, 12, 8, 50), 5),
        ((1, 20, 32, 11), 1024),  # one chunk
        ((4, 6, 24, 64), 2),
    ],
)
def test_values_and_all_grads_match_plain_path(shape, chunk_size, use_bias, dtype):
    hidden, weight, bias, labels = make_case(*shape, dtype=dtype, bias=use_bias)
    for x in (hidden, weight, bias):
        if x is not None:
            x.requires_grad_(True)
    ref, ref_grads = grads(plain_token_logprobs, hidden, weight, bias, labels)
    out, out_grads = grads(fused(chunk_size), hidden, weight, bias, labels)
    assert out.shape == labels.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.all(out[labels == -100] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(out_grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_weight_grad_and_same_hidden_grad():
    hidden, weight, bias, labels = make_case(2, 10, 16, 40)
    hidden.requires_grad_(True)
    out = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=3)
    out.sum().backward()
    assert weight.grad is None and bias.grad is None
    want = hidden.detach().clone().requires_grad_(True)
    plain_token_logprobs(want, weight, labels, bias).sum().backward()
    torch.testing.assert_close(hidden.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_head_only_grads_when_hidden_is_frozen():
    hidden, weight, bias, labels = make_case(2, 10, 16, 40)
    weight.requires_grad_(True)
    out = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=3)
    out.sum().backward()
    want = weight.detach().clone().requires_grad_(True)
    plain_token_logprobs(hidden, want, labels, bias).sum().backward()
    torch.testing.assert_close(weight.grad, want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "vocab_tile", [None, 64]
)  # 64: the tiled path (300 = 4·64 + 44)
def test_bf16_inputs_stay_close_to_fp32_and_keep_their_grad_dtype(vocab_tile):
    hidden, weight, _, labels = make_case(2, 32, 64, 300, bias=False)
    h16 = hidden.bfloat16().requires_grad_(True)
    w16 = weight.bfloat16().requires_grad_(True)
    out = token_logprobs(h16, w16, labels, chunk_size=7, vocab_tile=vocab_tile)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    h32 = h16.detach().float().requires_grad_(True)
    w32 = w16.detach().float().requires_grad_(True)
    ref = plain_token_logprobs(h32, w32, labels)
    ref.sum().backward()
    # bf16 logits carry ~3 significant digits; log-probs here are ~ -6.
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h16.grad.float(), h32.grad, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=5e-2, atol=2e-2)


def test_gradcheck_float64():
    hidden, weight, bias, labels = make_case(2, 5, 4, 7, dtype=torch.float64)
    inputs = tuple(x.requires_grad_(True) for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: token_logprobs(h, w, labels, bias=b, chunk_size=2), inputs
    )


class RecordOutputs(TorchDispatchMode):
    """Every aten op's tensor outputs (shapes), i.e. every tensor that gets created."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def largest_tensor(fn) -> int:
    with RecordOutputs() as rec:
        fn()
    return max(torch.Size(s).numel() for _, s in rec.shapes)


@pytest.mark.parametrize("train_head", [False, True])
def test_never_builds_a_tokens_by_vocab_tensor(train_head):
    n_tok, hid, vocab, chunk = 64, 8, 50, 16
    hidden = torch.randn(1, n_tok, hid, requires_grad=True)
    weight = torch.randn(vocab, hid, requires_grad=train_head)
    labels = torch.randint(0, vocab, (1, n_tok))

    def step(fn):
        return lambda: fn(hidden, weight, labels).sum().backward()

    # The recorder is real: the plain path does create [N, V] tensors.
    assert largest_tensor(step(plain_token_logprobs)) >= n_tok * vocab
    biggest = largest_tensor(
        step(lambda h, w, y: token_logprobs(h, w, y, chunk_size=chunk))
    )
    assert biggest <= max(chunk * vocab, n_tok * hid, vocab * hid) < n_tok * vocab


def test_prompt_tokens_never_reach_the_vocab_projection():
    hidden, weight, _, labels = make_case(2, 30, 8, 97, bias=False)
    with RecordOutputs() as rec:
        token_logprobs(hidden, weight, labels, chunk_size=4)
    projected = [s for f, s in rec.shapes if "mm" in f and s[-1] == 97]
    assert sum(s[0] for s in projected) == int((labels != -100).sum())
    assert max(s[0] for s in projected) == 4


def test_no_grad_pass_projects_onto_the_vocabulary_once():
    hidden, weight, bias, labels = make_case(2, 30, 8, 97)
    hidden.requires_grad_(True)

    def back_projections(grad_enabled):
        with RecordOutputs() as rec, torch.set_grad_enabled(grad_enabled):
            out = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=4)
        return out, [s for f, s in rec.shapes if "mm" in f and s[-1] == 8]

    assert back_projections(True)[1]  # p @ W, for the hidden-state gradient
    out, projections = back_projections(False)
    assert not out.requires_grad and not projections
    want = plain_token_logprobs(hidden, weight, labels, bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_all_ignored_gives_zeros_and_zero_grads():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    out = token_logprobs(hidden, weight, labels)
    out.sum().backward()
    assert torch.all(out == 0)
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_non_contiguous_hidden_and_custom_ignore_index():
    hidden, weight, bias, labels = make_case(3, 8, 16, 20)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    labels = labels.masked_fill(labels == -100, -1)
    out = token_logprobs(hidden_t, weight, labels, bias=bias, ignore_index=-1)
    ref = plain_token_logprobs(hidden, weight, labels, bias, ignore_index=-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), r"must be labels"),
        (dict(weight=torch.randn(11, 7)), r"weight must be \[V, H=8\]"),
        (dict(bias=torch.randn(12)), r"bias must be \[V=11\]"),
        (dict(labels=torch.full((2, 5), 11)), r"label 11 is outside \[0, 11\)"),
        (dict(labels=torch.full((2, 5), -3)), r"label -3 is outside"),
        (dict(labels=torch.zeros(2, 5)), r"integer token ids"),
        (dict(chunk_size=0), r"chunk_size must be >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    args = dict(
        hidden=torch.randn(2, 5, 8),
        weight=torch.randn(11, 8),
        labels=torch.zeros(2, 5, dtype=torch.long),
        bias=torch.randn(11),
        chunk_size=4,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        token_logprobs(
            args["hidden"],
            args["weight"],
            args["labels"],
            bias=args["bias"],
            chunk_size=args["chunk_size"],
        )


def test_non_finite_inputs_raise_floating_point_error():
    hidden = torch.randn(1, 4, 8)
    hidden[0, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf log-probs"):
        token_logprobs(hidden, torch.randn(9, 8), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(FloatingPointError, match="NaN/inf log-probs"):
        mixed_token_logprobs(
            hidden,
            hidden,
            torch.randn(9, 8),
            torch.zeros(1, 4, dtype=torch.long),
            mix=2,
        )


def plain_mixed(hidden, ref_hidden, weight, ref_weight, bias, ref_bias, labels, mix):
    """Full logits of both models, mixed, then log_softmax and gather."""
    z_pol = torch.nn.functional.linear(hidden, weight, bias).double()
    z_ref = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias).double()
    logp = (mix * z_pol + (1 - mix) * z_ref).log_softmax(-1)
    out = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (out * (labels != -100)).float()


@pytest.mark.parametrize("mix", [1.5, 1.125, 0.5])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_mixed_logprobs_equal_full_logit_mixture(mix, chunk_size):
    hidden, weight, bias, labels = make_case(2, 11, 16, 45)
    ref_hidden, ref_weight, ref_bias, _ = make_case(2, 11, 16, 45, seed=7)
    out = mixed_token_logprobs(
        hidden,
        ref_hidden,
        weight,
        labels,
        mix=mix,
        ref_weight=ref_weight,
        bias=bias,
        ref_bias=ref_bias,
        chunk_size=chunk_size,
    )
    want = plain_mixed(
        hidden, ref_hidden, weight, ref_weight, bias, ref_bias, labels, mix
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Same head by default (the LoRA case: adapter on vs off).
    shared = mixed_token_logprobs(
        hidden, ref_hidden, weight, labels, mix=mix, bias=bias, chunk_size=chunk_size
    )
    want = plain_mixed(hidden, ref_hidden, weight, weight, bias, bias, labels, mix)
    torch.testing.assert_close(shared, want, rtol=1e-5, atol=1e-5)


def test_mix_one_is_the_policy_logprobs():
    hidden, weight, bias, labels = make_case(2, 11, 16, 45)
    ref_hidden = torch.randn_like(hidden)
    out = mixed_token_logprobs(hidden, ref_hidden, weight, labels, mix=1.0, bias=bias)
    want = token_logprobs(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert not out.requires_grad


def test_mixed_logprobs_reject_mismatched_reference():
    hidden, weight, _, labels = make_case(2, 6, 8, 20)
    with pytest.raises(ValueError, match="ref_hidden"):
        mixed_token_logprobs(hidden, hidden[:1], weight, labels, mix=1.5)
    with pytest.raises(ValueError, match="vocabularies differ"):
        mixed_token_logprobs(
            hidden, hidden, weight, labels, mix=1.5, ref_weight=torch.randn(21, 8)
        )


def test_sequence_logprobs_sum_and_mean_over_labelled_tokens():
    token_lp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[-100, 4, 5, -100], [7, -100, -100, -100]])
    assert count_tokens(labels).tolist() == [2, 1]
    assert sequence_logprobs(token_lp, labels).tolist() == [-5.0, -0.5]
    assert sequence_logprobs(token_lp, labels, average=True).tolist() == [-2.5, -0.5]
    empty = torch.full((1, 3), -100)
    assert sequence_logprobs(torch.zeros(1, 3), empty, average=True).tolist() == [0.0]


def test_mixed_dtypes_are_promoted():
    hidden, weight, bias, labels = make_case(2, 9, 16, 40)
    w16 = weight.bfloat16().requires_grad_(True)
    out = token_logprobs(hidden, w16, labels, bias=bias)
    want = plain_token_logprobs(hidden, w16.detach().float(), labels, bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert w16.grad.dtype == torch.bfloat16
    ref16 = hidden.bfloat16()
    mixed = mixed_token_logprobs(hidden, ref16, weight, labels, mix=1.5, bias=bias)
    want = plain_mixed(hidden, ref16.float(), weight, weight, bias, bias, labels, 1.5)
    torch.testing.assert_close(mixed, want, rtol=1e-2, atol=5e-2)
