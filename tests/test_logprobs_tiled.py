"""The vocabulary-tiled fused path (online log-sum-exp over column tiles) equals the
plain path, values and every gradient, and never builds a block over its tile; so
does SPA's DND mixture (mixed_token_logprobs). Its
bf16 bound is the untiled one (test_logprobs.py, parametrized over vocab_tile)."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import RecordOutputs, grads, make_case, plain_mixed

from axolotl_prefalign.core.logprobs import (
    TILED_CHUNK,
    VOCAB_TILE,
    default_chunk_size,
    default_vocab_tile,
    mixed_token_logprobs,
    plain_token_logprobs,
    token_logprobs,
)


def tiled(chunk_size, tile):
    return lambda h, w, y, b: token_logprobs(
        h, w, y, bias=b, chunk_size=chunk_size, vocab_tile=tile
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize(
    ("shape", "chunk_size", "tile"),
    [
        ((2, 9, 16, 37), 4, 5),  # ragged rows and a ragged last tile (37 = 7·5 + 2)
        ((3, 12, 8, 50), 5, 1),  # one column per tile
        ((1, 20, 32, 64), 1024, 16),  # one row chunk, tiles divide V
        ((4, 6, 24, 64), 2, 63),  # a last tile of one column
    ],
)
def test_tiled_values_and_all_grads_match_plain(
    shape, chunk_size, tile, use_bias, dtype
):
    hidden, weight, bias, labels = make_case(*shape, dtype=dtype, bias=use_bias)
    for x in (hidden, weight, bias):
        if x is not None:
            x.requires_grad_(True)
    ref, ref_grads = grads(plain_token_logprobs, hidden, weight, bias, labels)
    out, out_grads = grads(tiled(chunk_size, tile), hidden, weight, bias, labels)
    assert torch.all(out[labels == -100] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(out_grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tiled_gradcheck_float64():
    hidden, weight, bias, labels = make_case(2, 5, 4, 7, dtype=torch.float64)
    inputs = tuple(x.requires_grad_(True) for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: token_logprobs(
            h, w, labels, bias=b, chunk_size=2, vocab_tile=3
        ),
        inputs,
    )


def test_confident_tokens_keep_a_relative_gradient():
    """p_y = 1 − 5e-10: the gradient W[y] − E_p[W] is ~1e-9, and the tiled path gets
    it to fp32 relative precision (float64 reference): it sums the other tokens'
    mass directly instead of forming 1 − p_y, which rounds to 0 in fp32."""
    gen = torch.Generator().manual_seed(3)
    vocab, hid = 40, 64
    basis, _ = torch.linalg.qr(
        torch.randn(hid, hid, generator=gen, dtype=torch.float64)
    )
    weight = basis[:vocab].float()  # orthonormal rows: z_v = c·[v = y] + noise
    labels = torch.randint(0, vocab, (1, 6), generator=gen)
    hidden = (weight[labels[0]] * 25.0)[None]
    hidden = hidden + 0.01 * torch.randn(hidden.shape, generator=gen)

    def grad_of(fn, h, w):
        h = h.clone().requires_grad_(True)
        fn(h, w, labels).sum().backward()
        return h.grad

    want = grad_of(plain_token_logprobs, hidden.double(), weight.double())
    assert 1e-10 < want.abs().max() < 1e-7  # confident indeed, and not zero
    for tile in (7, 13):
        got = grad_of(
            lambda h, w, y, t=tile: token_logprobs(h, w, y, vocab_tile=t),
            hidden,
            weight,
        )
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-14)


@pytest.mark.parametrize("train_head", [False, True])
def test_tiled_never_builds_a_block_over_its_tile(train_head):
    n_tok, hid, vocab, chunk, tile = 64, 8, 200, 16, 24
    hidden = torch.randn(1, n_tok, hid, requires_grad=True)
    weight = torch.randn(vocab, hid, requires_grad=train_head)
    labels = torch.randint(0, vocab, (1, n_tok))
    with RecordOutputs() as rec:
        token_logprobs(
            hidden, weight, labels, chunk_size=chunk, vocab_tile=tile
        ).sum().backward()
    vocab_wide = [s for _, s in rec.shapes if vocab in s and s != (vocab, hid)]
    assert not vocab_wide, vocab_wide  # nothing [*, V] but the weight (and its grad)
    blocks = [s for f, s in rec.shapes if "mm" in f and s[-1] != hid]
    assert blocks and max(torch.Size(s).numel() for s in blocks) <= chunk * tile


def test_default_blocks_tile_the_cpu_vocabulary_only():
    assert default_vocab_tile(128256, "cpu") == VOCAB_TILE
    assert default_vocab_tile(100, "cpu") == 100
    assert default_vocab_tile(128256, "meta") == 128256  # not the CPU: whole V
    # Default rows: TILED_CHUNK when tiled, default_chunk_size(V) when not.
    hidden, weight, _, labels = make_case(1, TILED_CHUNK + 40, 4, VOCAB_TILE + 3)
    labels[:] = 1
    with RecordOutputs() as rec:
        token_logprobs(hidden, weight, labels)
    rows = {s[0] for f, s in rec.shapes if "mm" in f and s[-1] in (VOCAB_TILE, 3)}
    assert rows == {TILED_CHUNK, 40}
    assert default_chunk_size(VOCAB_TILE + 3) > TILED_CHUNK  # the two differ


def test_bad_vocab_tile_is_a_clear_error():
    hidden, weight, _, labels = make_case(1, 4, 4, 9)
    with pytest.raises(ValueError, match="vocab_tile must be >= 1, got 0"):
        token_logprobs(hidden, weight, labels, vocab_tile=0)


@pytest.mark.parametrize("mix", [1.5, 0.5])
@pytest.mark.parametrize(
    ("chunk_size", "tile"), [(4, 7), (3, 1), (1024, 44)]
)  # 45 = 6·7 + 3; one column per tile; a last tile of one column
def test_tiled_mixed_logprobs_equal_full_logit_mixture(mix, chunk_size, tile):
    hidden, weight, bias, labels = make_case(2, 11, 16, 45)
    ref_hidden, ref_weight, ref_bias, _ = make_case(2, 11, 16, 45, seed=7)
    out = mixed_token_logprobs(
        hidden.requires_grad_(True),
        ref_hidden,
        weight,
        labels,
        mix=mix,
        ref_weight=ref_weight,
        bias=bias,
        ref_bias=ref_bias,
        chunk_size=chunk_size,
        vocab_tile=tile,
    )
    want = plain_mixed(
        hidden, ref_hidden, weight, ref_weight, bias, ref_bias, labels, mix
    )
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
    assert not out.requires_grad  # a judging pass: no gradient by design


@pytest.mark.parametrize(
    ("vocab", "tile"), [(200, 24), (VOCAB_TILE + 3, None)]
)  # None: the CPU default, VOCAB_TILE columns
def test_tiled_mixed_logprobs_never_build_a_block_over_its_tile(vocab, tile):
    n_tok, hid, chunk = 64, 8, 16
    hidden, ref_hidden = torch.randn(2, 1, n_tok, hid)
    weight, ref_weight = torch.randn(2, vocab, hid)
    labels = torch.randint(0, vocab, (1, n_tok))
    with RecordOutputs() as rec:
        mixed_token_logprobs(
            hidden,
            ref_hidden,
            weight,
            labels,
            mix=1.5,
            ref_weight=ref_weight,
            chunk_size=chunk,
            vocab_tile=tile,
        )
    vocab_wide = [s for _, s in rec.shapes if vocab in s and s != (vocab, hid)]
    assert not vocab_wide, vocab_wide  # nothing [*, V] but the weights
    blocks = [s for f, s in rec.shapes if "mm" in f and s[-1] != hid]
    assert blocks and max(torch.Size(s).numel() for s in blocks) <= chunk * (
        tile or VOCAB_TILE
    )


def test_dnd_mixing_uses_the_configured_vocab_tile(monkeypatch):
    """`prefalign.vocab_tile` reaches SPA's DND mixing as it reaches the loss."""
    from axolotl_prefalign.core import preference
    from axolotl_prefalign.core.config import PrefAlignConfig

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        return torch.zeros(2, 3)

    monkeypatch.setattr(preference, "mixed_token_logprobs", record)
    cfg = PrefAlignConfig.from_raw({"loss": "spa", "vocab_tile": 7})
    step = preference.PreferenceStep(cfg, reference=None)
    layout = type("L", (), {"labels": None, "per_sequence": staticmethod(lambda t: t)})
    w = torch.zeros(5, 4)
    step.mixed_logps(torch.zeros(2, 3, 4), (w, None), None, (w, None), layout)
    assert seen["vocab_tile"] == 7
