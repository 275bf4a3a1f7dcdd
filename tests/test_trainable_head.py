"""An lm_head trained through PEFT `modules_to_save` (and tied embeddings) on the
fused path: the policy uses the adapter's copy of the head, the reference the
original, exactly as the model's own full-logit forward does in each mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from axolotl_prefalign.core.config import PrefAlignConfig
from axolotl_prefalign.core.preference import PreferenceStep

# (tie_word_embeddings, modules_to_save); "tying" asks PEFT to keep the two
# copies tied (`ensure_weight_tying`), else each module gets its own copy.
CASES = [
    (False, ["lm_head"]),
    (False, ["embed_tokens", "lm_head"]),
    (True, ["lm_head"]),
    (True, ["embed_tokens", "lm_head"]),
    ("tying", ["embed_tokens", "lm_head"]),
]
IDS = ["untied-head", "untied-embed+head", "tied-head", "tied-embed+head", "tying"]
BETA = 0.1


def _base(tiny_model, tied: bool):
    if not tied:
        return tiny_model
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny_model.config)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def _peft(tiny_model, tied: bool | str, modules_to_save: list[str]):
    """LoRA on q/v plus fully trained copies, all moved off their start values."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _base(tiny_model, bool(tied)),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=modules_to_save,
            ensure_weight_tying=tied == "tying",
        ),
    )
    if tied == "tying":
        copies = [model.get_base_model().lm_head, model.get_input_embeddings()]
        head, embed = (m.modules_to_save["default"].weight for m in copies)
        assert head is embed
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA A/B and the modules_to_save copies
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.float()


def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    """Two pairs (chosen rows, then rejected rows), right-padded, prompt of 3."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 6:] = 0
    completion = mask.clone()
    completion[:, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def _plain_logps(model, inputs) -> torch.Tensor:
    """The model's own full logits → log_softmax → gather, summed per sequence."""
    ids = inputs["input_ids"]
    logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])
    return (lp.squeeze(-1) * inputs["completion_mask"][:, 1:]).sum(-1)


def _plain_loss(model, inputs):
    pol = _plain_logps(model, inputs)
    with torch.no_grad(), model.disable_adapter():
        ref = _plain_logps(model, inputs)
    (c, r), (rc, rr) = pol.chunk(2), ref.chunk(2)
    losses = -F.logsigmoid(BETA * ((c - rc) - (r - rr)))
    return losses, pol, ref


def _ours(model, inputs, **pa):
    step = PreferenceStep(
        PrefAlignConfig.from_raw({"loss": "sigmoid", **pa}),
        lambda m: (m, m.disable_adapter()),
    )
    return step(model, inputs, beta=BETA, training=True, step=0, max_steps=1)


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(("tied", "modules"), CASES, ids=IDS)
def test_fused_logps_loss_and_grads_equal_the_models_own_logits(
    tiny_model, tied, modules
):
    model = _peft(tiny_model, tied, modules)
    inputs = _inputs(model.config.vocab_size)
    want, want_pol, want_ref = _plain_loss(model, inputs)
    want.mean().backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    out = _ours(model, inputs)
    got_pol = torch.cat([out.chosen_logps, out.rejected_logps])
    got_ref = torch.cat([out.ref_chosen_logps, out.ref_rejected_logps])
    assert not torch.allclose(want_pol, want_ref, atol=1e-3)  # the copy matters
    torch.testing.assert_close(got_pol, want_pol, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ref, want_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses, want, rtol=1e-5, atol=1e-6)
    out.losses.mean().backward()
    got_grads = _grads(model)
    assert got_grads.keys() == want_grads.keys()
    assert any("modules_to_save.default" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(
            got_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name
        )


@pytest.mark.parametrize(("tied", "modules"), CASES, ids=IDS)
def test_a_step_trains_the_heads_copy_and_leaves_the_original(
    tiny_model, tied, modules
):
    model = _peft(tiny_model, tied, modules)
    wrapper = model.get_base_model().lm_head
    original = wrapper.original_module.weight.detach().clone()
    trained = wrapper.modules_to_save["default"].weight.detach().clone()
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.5)
    _ours(model, _inputs(model.config.vocab_size)).losses.mean().backward()
    optim.step()
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.allclose(wrapper.modules_to_save["default"].weight, trained)
    from axolotl_prefalign.core.heads import head_in_use

    with model.disable_adapter():
        assert head_in_use(model) is wrapper.original_module
    assert head_in_use(model) is wrapper.modules_to_save["default"]


def test_spa_dnd_margin_uses_each_modes_head(tiny_model):
    model = _peft(tiny_model, False, ["lm_head"])
    inputs = _inputs(model.config.vocab_size)
    lam = 0.5
    spa = {"iteration": 1, "alpha_warmup_ratio": 0.0, "dnd_lambdas": [lam]}
    out = _ours(model, inputs, loss="spa", spa=spa)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=am).logits[:, :-1]
        with model.disable_adapter():
            z_ref = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    mask = inputs["completion_mask"][:, 1:]
    g = ((1 + lam) * z - lam * z_ref).log_softmax(-1).gather(-1, ids[:, 1:, None])
    g = (g.squeeze(-1) * mask).sum(-1)
    gc, gr = g.chunk(2)
    m_g = (gc - out.ref_chosen_logps) - (gr - out.ref_rejected_logps)
    torch.testing.assert_close(
        out.metrics["spa/dnd_margin"], BETA * m_g, rtol=1e-5, atol=1e-6
    )


def test_spa_judge_logps_use_each_modes_head(tiny_model):
    from axolotl_prefalign.spa.judge import sequence_logprobs

    model = _peft(tiny_model, False, ["lm_head"])
    encoded = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15])]

    def plain():
        out = []
        for prompt, completion in encoded:
            ids = torch.tensor([prompt + completion])
            lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            lp = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            out.append(lp[len(prompt) - 1 :].sum())
        return torch.stack(out).double()

    with torch.no_grad():
        want = plain()
        with model.disable_adapter():
            want_ref = plain()
            got_ref, _ = sequence_logprobs(model, encoded, pad_id=0)
    got, _ = sequence_logprobs(model, encoded, pad_id=0)
    assert not torch.allclose(want, want_ref, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ref, want_ref, rtol=1e-5, atol=1e-5)


PAIRS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": " Paris.",
        "rejected": " Berlin is it.",
    },
    {"prompt": "Add 2 and 3.", "chosen": " 5", "rejected": " 6 or 7"},
]


def test_axolotl_dpo_trainer_steps_with_lm_head_in_modules_to_save(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
        PrefAlignDPOTrainer,
    )

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    args = AxolotlDPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        beta=BETA,
        max_length=64,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,
        max_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
    )
    trainer = PrefAlignDPOTrainer(
        model,
        None,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer,
        prefalign=PrefAlignConfig.from_raw({"loss": "sigmoid"}),
    )
    model = trainer.model
    wrapper = model.get_base_model().lm_head
    with torch.no_grad():  # the trained copy only; TRL's "ref" copy stays
        wrapper.modules_to_save["default"].weight.mul_(1.5)
    original = wrapper.original_module.weight.detach().clone()
    trained = wrapper.modules_to_save["default"].weight.detach().clone()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    want, _, _ = _plain_loss(model, batch)
    got = trainer.compute_loss(model, batch)
    assert abs(got.item() - 0.6931) > 1e-3  # policy and reference differ
    torch.testing.assert_close(got, want.mean(), rtol=1e-5, atol=1e-6)

    trainer.train()
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.allclose(wrapper.modules_to_save["default"].weight, trained)


def _dpo_yaml(**extra) -> dict:
    return {"rl": "dpo", "adapter": "lora", "prefalign": {"loss": "sigmoid"}, **extra}


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], "lm_head|.*proj"])
def test_lora_on_the_lm_head_is_refused_at_register_naming_the_key(targets):
    from axolotl_prefalign.core.config import PrefAlignConfigError
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    raw = _dpo_yaml(lora_target_modules=targets)
    with pytest.raises(PrefAlignConfigError) as err:
        PrefAlignPlugin().register(raw)
    message = str(err.value)
    assert message.startswith("lora_target_modules: ")
    assert "puts LoRA on the lm_head" in message
    assert "lora_modules_to_save: [embed_tokens, lm_head]" in message


def test_lm_head_in_modules_to_save_is_accepted_at_register(tiny_model_dir):
    from axolotl_prefalign.integrations.axolotl.plugin import (
        TRAINER_CLS,
        PrefAlignPlugin,
    )

    raw = _dpo_yaml(
        base_model=str(tiny_model_dir),
        lora_target_modules=["q_proj", "v_proj"],
        lora_modules_to_save=["embed_tokens", "lm_head"],
    )
    PrefAlignPlugin().register(raw)
    assert raw["trainer_cls"] == TRAINER_CLS


def test_a_model_that_softcaps_its_logits_is_refused_at_register(tmp_path):
    from transformers import Gemma2Config

    from axolotl_prefalign.core.config import PrefAlignConfigError
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    Gemma2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(
        tmp_path
    )
    raw = _dpo_yaml(base_model=str(tmp_path))
    with pytest.raises(
        PrefAlignConfigError,
        match=rf"base_model: {tmp_path} post-processes its logits "
        r"\(config\.final_logit_softcapping = 30\.0\)",
    ):
        PrefAlignPlugin().register(raw)
