"""The plugin's DPO trainer against Axolotl's stock DPO trainer and plain math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl.trainer.utils import use_adapter

from axolotl_prefalign.core.config import PrefAlignConfig
from axolotl_prefalign.core.losses import preference_loss

PAIRS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " Berlin is it.",
    },
    {"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " 6 or 7"},
    {"prompt": "Say yes.", "chosen": " yes", "rejected": " no no no"},
    {"prompt": "Is fire hot?", "chosen": " true", "rejected": " false, it is cold."},
]


def _peft_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    # Non-zero B so the policy differs from the adapter-off reference.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _args(tmp_path, **kw):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=0.1,
        max_length=64,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        max_steps=1,
    )
    base.update(kw)
    return AxolotlDPOConfig(**base)


def _trainer(cls, model, tok, tmp_path, rows=PAIRS, args_kw=None, **kw):
    return cls(
        model,
        None,
        args=_args(tmp_path, **(args_kw or {})),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        **kw,
    )


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def plain_sequence_logps(model, batch):
    """Full logits → log_softmax → gather, summed over the completion."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok = lp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (tok * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.fixture()
def ours(tiny_model_dir, tiny_tokenizer, tmp_path):
    from axolotl_prefalign.integrations.axolotl.trainers.dpo import PrefAlignDPOTrainer

    def make(loss="sigmoid", rows=PAIRS, args_kw=None, **pa):
        model = _peft_model(tiny_model_dir)
        cfg = PrefAlignConfig.from_raw({"loss": loss, **pa})
        trainer = _trainer(
            PrefAlignDPOTrainer,
            model,
            tiny_tokenizer,
            tmp_path,
            rows,
            args_kw,
            prefalign=cfg,
        )
        _perturb_adapter(trainer.model)
        return trainer

    return make


def _perturb_adapter(model, seed=1):
    """Move the trained adapter away from its frozen "ref" copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_sigmoid_loss_equals_axolotl_stock_dpo(
    ours, tiny_model_dir, tiny_tokenizer, tmp_path
):
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

    stock = _trainer(
        AxolotlDPOTrainer, _peft_model(tiny_model_dir), tiny_tokenizer, tmp_path / "s"
    )
    mine = ours("sigmoid")
    _perturb_adapter(stock.model)  # `ours` already did the same to its adapter
    batch = _batch(stock)
    assert torch.equal(batch["input_ids"], _batch(mine)["input_ids"])
    stock_loss = stock.compute_loss(stock.model, batch)
    our_loss = mine.compute_loss(mine.model, batch)
    assert mine.ref_model is None  # the reference is an adapter, not a model copy
    assert abs(our_loss.item() - 0.6931) > 1e-3  # policy and reference differ
    torch.testing.assert_close(our_loss, stock_loss, rtol=1e-5, atol=1e-6)
    # and the gradients of the LoRA weights agree too
    stock_loss.backward()
    our_loss.backward()
    for (n1, p1), (_n2, p2) in zip(
        stock.model.named_parameters(), mine.model.named_parameters(), strict=True
    ):
        if p1.requires_grad:
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=n1)


def test_lm_head_sees_one_position_only(ours):
    trainer = ours("sigmoid")
    batch = _batch(trainer)
    seen = []
    head = trainer.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    try:
        trainer.compute_loss(trainer.model, batch)
    finally:
        handle.remove()
    assert seen, "the lm_head should still run (for one position)"
    assert all(shape[1] == 1 for shape in seen), seen


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "robust", "ipo", "hinge"])
def test_each_loss_matches_preference_loss_on_plain_logps(ours, loss):
    pa = {"label_smoothing": 0.2} if loss in ("cdpo", "robust") else {}
    trainer = ours(loss, **pa)
    batch = _batch(trainer)
    got = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        pol = plain_sequence_logps(trainer.model, batch)
        with use_adapter(trainer.model, "ref"):
            ref = plain_sequence_logps(trainer.model, batch)
    lengths = batch["completion_mask"][:, 1:].sum(-1).float()
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    lc, lr = lengths.chunk(2)
    expected = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss,
        beta=0.1,
        chosen_lengths=lc,
        rejected_lengths=lr,
        **pa,
    ).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_soft_loss_uses_judge_prob_column(ours):
    rows = [
        dict(r, judge_prob=p) for r, p in zip(PAIRS, [0.9, 0.6, 0.55, 1.0], strict=True)
    ]
    trainer = ours("soft", rows=rows)
    batch = _batch(trainer)
    # The loader shuffles: each pair keeps its own judge_prob.
    by_prompt = {r["prompt"]: r["judge_prob"] for r in rows}
    prompt_len = batch["completion_mask"][:4].argmax(-1)  # first completion token
    tok = trainer.processing_class
    for i in range(4):
        text = tok.decode(batch["input_ids"][i, : prompt_len[i]])
        assert batch["judge_prob"][i].item() == pytest.approx(by_prompt[text.strip()])
    got = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        pol = plain_sequence_logps(trainer.model, batch)
        with use_adapter(trainer.model, "ref"):
            ref = plain_sequence_logps(trainer.model, batch)
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    z = 0.1 * ((pc - rc) - (pr - rr))
    p = batch["judge_prob"]
    expected = (-(p * F.logsigmoid(z)) - (1 - p) * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_soft_loss_without_judge_prob_is_a_clear_error(ours):
    trainer = ours("soft")
    with pytest.raises(ValueError, match="needs a judge_prob column"):
        trainer.compute_loss(trainer.model, _batch(trainer))


def test_metrics_use_trl_names(ours):
    trainer = ours("sigmoid")
    trainer.compute_loss(trainer.model, _batch(trainer))
    names = set(trainer._metrics["train"])
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert name in names


def _dnd_margin_plain(model, batch, lam):
    """m_g from full logits: z_g = (1+λ) z_θ − λ z_ref, then the DPO margin vs ref."""
    with torch.no_grad():
        ids, am = batch["input_ids"], batch["attention_mask"]
        z = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        with use_adapter(model, "ref"):
            z_ref = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        tgt = ids[:, 1:, None]
        mask = batch["completion_mask"][:, 1:]
        g = ((1 + lam) * z - lam * z_ref).log_softmax(-1).gather(-1, tgt).squeeze(-1)
        r = z_ref.log_softmax(-1).gather(-1, tgt).squeeze(-1)
        g, r = (g * mask).sum(-1), (r * mask).sum(-1)
        gc, gr = g.chunk(2)
        rc, rr = r.chunk(2)
        return (gc - rc) - (gr - rr), z, z_ref


def test_spa_dnd_margin_and_refined_loss_match_full_logit_computation(ours):
    trainer = ours(
        "spa", spa={"iteration": 1, "alpha_warmup_ratio": 0.0, "noise_quantile": 0.5}
    )
    assert trainer.pref_step.dnd_lambda == 0.5
    batch = _batch(trainer)
    got = trainer.compute_loss(trainer.model, batch)
    m_g, _, _ = _dnd_margin_plain(trainer.model, batch, 0.5)
    scaled = 0.1 * m_g
    torch.testing.assert_close(
        torch.tensor(trainer._metrics["train"]["spa/dnd_margin"][-1]),
        scaled.mean(),
        rtol=1e-4,
        atol=1e-6,
    )
    tau = torch.quantile(scaled, 0.5)
    torch.testing.assert_close(
        torch.tensor(trainer._metrics["train"]["spa/threshold"][-1]),
        tau,
        rtol=1e-4,
        atol=1e-6,
    )
    confident = scaled > tau
    assert trainer._metrics["train"]["spa/noisy_fraction"][-1] == pytest.approx(
        (~confident).float().mean().item()
    )
    with torch.no_grad():
        pol = plain_sequence_logps(trainer.model, batch)
        with use_adapter(trainer.model, "ref"):
            ref = plain_sequence_logps(trainer.model, batch)
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    h = (pc - rc) - (pr - rr)
    c = confident.float()
    a = 0.1
    expected = (
        -(1 - a + a * c) * F.logsigmoid(0.1 * h) - (a - a * c) * F.logsigmoid(-0.1 * h)
    ).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_spa_alpha_is_zero_during_warmup(ours):
    trainer = ours("spa", args_kw={"max_steps": 10}, spa={"alpha_warmup_ratio": 0.2})
    trainer.state.max_steps = 10
    trainer.state.global_step = 1
    trainer.compute_loss(trainer.model, _batch(trainer))
    assert trainer._metrics["train"]["spa/alpha"][-1] == 0.0
    trainer.state.global_step = 2
    trainer.compute_loss(trainer.model, _batch(trainer))
    assert trainer._metrics["train"]["spa/alpha"][-1] == pytest.approx(0.1)


def test_spa_lambda_follows_the_iteration_schedule(ours):
    assert ours("spa", spa={"iteration": 2}).pref_step.dnd_lambda == 0.25
    assert ours("spa", spa={"iteration": 5}).pref_step.dnd_lambda == 0.125
    assert ours("spa", spa={"iteration": 1, "dnd": False}).pref_step.dnd_lambda == 0.0


def test_reference_cache_matches_live_reference(ours):
    live = ours("sigmoid")
    cached = ours("sigmoid", args_kw={"precompute_ref_log_probs": True})
    batch_live = _batch(live)
    batch_cached = _batch(cached)
    assert "ref_chosen_logps" in batch_cached
    with torch.no_grad():
        with use_adapter(live.model, "ref"):
            ref = plain_sequence_logps(live.model, batch_live)
    rc, rr = ref.chunk(2)
    torch.testing.assert_close(
        batch_cached["ref_chosen_logps"], rc, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        batch_cached["ref_rejected_logps"], rr, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        cached.compute_loss(cached.model, batch_cached),
        live.compute_loss(live.model, batch_live),
        rtol=1e-5,
        atol=1e-6,
    )


def test_packed_layout_bookkeeping_is_exact():
    from axolotl_prefalign.core.preference import BatchLayout

    # Two chosen and two rejected sequences, right-padded with 0, as TRL collates.
    ids = torch.tensor(
        [[5, 6, 7, 8, 0], [9, 10, 11, 0, 0], [5, 6, 12, 13, 14], [9, 10, 15, 0, 0]]
    )
    attn = (ids != 0).long()
    comp = torch.tensor(
        [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    )
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    packed = BatchLayout.packed(inputs)
    assert packed.model_kwargs["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 10, 11, 5, 6, 12, 13, 14, 9, 10, 15]
    ]
    assert packed.model_kwargs["position_ids"].tolist() == [
        [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]
    ]
    assert "attention_mask" not in packed.model_kwargs
    X = -100  # ignored
    assert packed.labels.tolist() == [
        X,
        7,
        8,
        X,
        10,
        11,
        X,
        X,
        12,
        13,
        14,
        X,
        10,
        15,
        X,
    ]
    assert packed.segment.tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 3
    padded = BatchLayout.padded(inputs)
    assert packed.lengths().tolist() == padded.lengths().tolist() == [2, 2, 3, 2]
    values = torch.arange(15, dtype=torch.float32)
    assert packed.per_sequence(values).tolist() == [6.0, 15.0, 45.0, 39.0]


@pytest.mark.parametrize("loss", ["sigmoid", "spa"])
def test_packed_forward_equals_padded(ours, loss):
    padded = ours(loss)
    packed = ours(loss, packing=True)
    batch = _batch(padded)
    l_pad = padded.compute_loss(padded.model, batch)
    l_pack = packed.compute_loss(packed.model, batch)
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-5, atol=1e-6)
    for name in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert packed._metrics["train"][name][-1] == pytest.approx(
            padded._metrics["train"][name][-1], rel=1e-5, abs=1e-6
        )
    l_pad.backward()
    l_pack.backward()
    for (n1, p1), (_n2, p2) in zip(
        padded.model.named_parameters(), packed.model.named_parameters(), strict=True
    ):
        if p1.requires_grad and p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=n1)


def test_fsdp1_flat_lm_head_is_a_clear_error(ours):
    # ZeRO-3 and FSDP2 train (tests/test_sharded_heads.py); FSDP1 is refused.
    trainer = ours("sigmoid")
    head = trainer.model.get_base_model().get_output_embeddings()

    # FSDP1 (use_orig_params): the full weight inside the head's own forward,
    # an empty view after it, where the fused path reads it.
    def reshard(module, args, output):
        module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    head.register_forward_hook(reshard)
    with pytest.raises(RuntimeError, match="FSDP1's flat parameters"):
        trainer.compute_loss(trainer.model, _batch(trainer))
