"""The dtype paths a GPU takes, on the CPU: bf16 log-probs, and the DPO trainer step
with bf16 weights and autocast (padded, packed) and with QLoRA (NF4), against
Axolotl's stock trainer on the same batch."""

from __future__ import annotations

import math

import pytest
import torch
from test_dpo_trainer import PAIRS, _batch, _perturb_adapter, _trainer

from axolotl_prefalign.core.config import PrefAlignConfig
from axolotl_prefalign.core.logprobs import (
    default_chunk_size,
    plain_token_logprobs,
    token_logprobs,
)


def _grads(fn, hidden, weight, labels, dtype):
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    lp = fn(h, w, labels)
    lp.sum().backward()
    return lp.float(), h.grad.float(), w.grad.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("vocab, hidden_size", [(1000, 64), (5000, 128)])
def test_bf16_fused_is_as_accurate_as_bf16_plain(vocab, hidden_size):
    """Both paths from the same bf16 inputs against fp32 math on them: the fused path
    is no less accurate than the plain one (values and both gradients), and close
    to it; a quarter of the targets are the argmax (p ≈ 1, where cancellation bites).
    """
    torch.manual_seed(0)
    n = 384
    weight = (torch.randn(vocab, hidden_size) * 0.05).bfloat16()
    hidden = torch.randn(n, hidden_size).bfloat16()
    labels = torch.randint(0, vocab, (n,))
    labels[: n // 4] = (hidden[: n // 4].float() @ weight.float().t()).argmax(-1)
    ref = _grads(plain_token_logprobs, hidden, weight, labels, torch.float32)
    plain = _grads(plain_token_logprobs, hidden, weight, labels, torch.bfloat16)
    fused = _grads(
        lambda h, w, y: token_logprobs(h, w, y, chunk_size=96),
        hidden,
        weight,
        labels,
        torch.bfloat16,
    )
    assert fused[0].dtype == torch.float32
    err_val = (fused[0] - ref[0]).abs().max().item()
    assert err_val <= 1.5 * (plain[0] - ref[0]).abs().max().item() + 1e-3
    assert (fused[0] - plain[0]).abs().max().item() <= 0.05
    for k in (1, 2):  # d/d hidden, d/d weight
        assert _rel(fused[k], ref[k]) <= 1.5 * _rel(plain[k], ref[k]) + 1e-3
        assert _rel(fused[k], plain[k]) <= 2e-2


@pytest.mark.parametrize(
    "vocab, chunk",
    [(32000, 1024), (49152, 640), (128256, 256), (151936, 192), (262144, 128)],
)
def test_default_chunk_bounds_the_logits_block(vocab, chunk):
    assert default_chunk_size(vocab) == chunk
    assert chunk * vocab <= 2**25 and chunk % 64 == 0


def test_default_chunk_stays_in_range():
    assert default_chunk_size(10) == 4096
    assert default_chunk_size(10**7) == 64


# -- the trainer step in bf16 ------------------------------------------------------


def _bf16_peft(model_dir, quantized: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    kwargs = {"dtype": torch.bfloat16}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "qlora-nf4"])
def test_bf16_dpo_step_matches_stock_and_trains_padded_and_packed(
    tiny_model_dir, tiny_tokenizer, tmp_path, quantized
):
    """bf16 weights, bf16 autocast (as on a GPU), optionally NF4 base weights: our
    loss on the same batch is the stock trainer's within bf16 rounding, padded and
    packed, and two optimizer steps run with finite losses."""
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

    from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
        PrefAlignDPOTrainer,
    )

    if quantized:
        pytest.importorskip("bitsandbytes")
    args_kw = {"bf16": True, "max_steps": 2, "learning_rate": 1e-3}
    stock = _trainer(
        AxolotlDPOTrainer,
        _bf16_peft(tiny_model_dir, quantized),
        tiny_tokenizer,
        tmp_path / "stock",
        args_kw=args_kw,
    )
    _perturb_adapter(stock.model)
    batch = _batch(stock)
    with torch.no_grad(), stock.compute_loss_context_manager():
        stock_loss = stock.compute_loss(stock.model, batch).float().item()
    assert abs(stock_loss - math.log(2)) > 1e-3  # policy and reference differ
    for packing in (False, True):
        ours = _trainer(
            PrefAlignDPOTrainer,
            _bf16_peft(tiny_model_dir, quantized),
            tiny_tokenizer,
            tmp_path / f"ours-{packing}",
            args_kw=args_kw,
            prefalign=PrefAlignConfig(loss="sigmoid", packing=packing),
        )
        _perturb_adapter(ours.model)
        with torch.no_grad(), ours.compute_loss_context_manager():
            loss = ours.compute_loss(ours.model, batch).float().item()
        assert loss == pytest.approx(stock_loss, rel=2e-2, abs=2e-3), packing
        result = ours.train()
        assert math.isfinite(result.training_loss)
        logged = [h for h in ours.state.log_history if "loss" in h]
        assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert len(PAIRS) == 4
