"""The lm_head lookup shared by every user of the fused log-prob path."""

from __future__ import annotations

import pytest
import torch

from axolotl_prefalign.core.heads import causal_lm, head_in_use, lm_head_weights


def test_plain_head_of_a_peft_model_is_the_base_models_linear(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert causal_lm(peft) is tiny_model
    with lm_head_weights(peft) as (weight, bias):
        assert weight is tiny_model.lm_head.weight
    assert bias is None


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("final_logit_softcapping", 30.0),
        ("logit_scale", 0.0625),
        ("logits_scaling", 8.0),
    ],
)
def test_models_that_postprocess_logits_are_refused(tiny_model, attr, value):
    setattr(tiny_model.config, attr, value)
    with pytest.raises(NotImplementedError, match=rf"config\.{attr} = {value}"):
        head_in_use(tiny_model)


@pytest.mark.parametrize(
    ("attr", "value"), [("logit_scale", 1.0), ("logits_scaling", None)]
)
def test_neutral_postprocessing_values_are_fine(tiny_model, attr, value):
    setattr(tiny_model.config, attr, value)
    assert head_in_use(tiny_model) is tiny_model.lm_head


def test_lora_on_the_lm_head_is_refused(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(TypeError) as err:
        head_in_use(peft)
    assert "cannot reproduce a LoRA layer on the lm_head" in str(err.value)
    assert "lora_modules_to_save: [lm_head]" in str(err.value)


def test_an_fsdp1_flat_view_is_refused_naming_fsdp2(tiny_model):
    tiny_model.lm_head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    with (
        pytest.raises(RuntimeError, match=r"FSDP1.*use FSDP2 \(fsdp_version: 2\)"),
        lm_head_weights(tiny_model),
    ):
        pass


def test_through_output_leaves_an_unsharded_models_hidden_states_alone(tiny_model):
    from axolotl_prefalign.core.heads import through_output

    ids = torch.tensor([[5, 6, 7]])
    out = tiny_model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    assert through_output(tiny_model, hidden, out) is hidden
