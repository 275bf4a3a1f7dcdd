"""Held-out preference accuracy (`prefalign eval-pairs`): the margins are summed
response log-probs of the pairs as training renders them, base vs trained."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from axolotl_prefalign.integrations.axolotl.eval_pairs import accuracy, pair_margins


def _turn(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


PAIRS = [
    (_turn("What is 2+2?"), "4", "5"),
    (_turn("Say yes."), "yes", "no"),
    (_turn("Colour of grass?"), "green", "blue bird"),
]


def _plain_logp(model, tokenizer, prompt: str, completion: str) -> float:
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0, :-1].float()
    logp = logits.log_softmax(-1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    return logp[len(p) - 1 :].sum().item()


def test_margins_equal_a_plain_forward_with_full_logits(tiny_model, tiny_tokenizer):
    margins = pair_margins(tiny_model.eval(), tiny_tokenizer, PAIRS, batch_size=2)
    expected = [
        _plain_logp(tiny_model, tiny_tokenizer, p, c)
        - _plain_logp(tiny_model, tiny_tokenizer, p, r)
        for p, c, r in PAIRS
    ]
    assert margins == pytest.approx(expected, abs=1e-4)
    result = accuracy(margins)
    assert result.pairs == 3
    assert result.accuracy == sum(m > 0 for m in expected) / 3
    with pytest.raises(ValueError, match="no held-out pairs"):
        accuracy([])


def test_cli_compares_the_base_with_the_adapter_on_the_held_out_rows(
    tiny_model_dir, tmp_path
):
    from click.testing import CliRunner
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_prefalign.cli import prefalign

    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)}
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = tmp_path / "out"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    model.save_pretrained(adapter)
    config = tmp_path / "config.yml"
    cfg = {
        "base_model": str(tiny_model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {"loss": "sigmoid"},
        "rl": "dpo",
        "adapter": "lora",
        "datasets": [
            {
                "path": str(data),
                "ds_type": "json",
                "split": "train[:2]",
                "type": "chatml.prompt_pairs",
            }
        ],
        "output_dir": str(adapter),
        "sequence_len": 128,
        "micro_batch_size": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
    }
    config.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(
        prefalign, ["eval-pairs", str(config), "--split", "train[2:]"]
    )
    assert result.exit_code == 0, result.output
    # stdout only: progress bars (transformers' "Loading weights") go to stderr,
    # which click's result.output interleaves without a newline.
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("held-out preference accuracy on 4 pairs of ")
    assert "[train[2:]]: base " in line and " -> trained " in line
    assert line.endswith(f"trained model: {adapter.resolve()}")


def _pairs_cfg(tmp_path, model_dir, rows: list[dict], dataset_type) -> object:
    """Axolotl's validated config of a DPO run on `rows` with `type: dataset_type`."""
    from axolotl_prefalign.cli import load_config

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {"loss": "sigmoid"},
        "rl": "dpo",
        "datasets": [{"path": str(data), "ds_type": "json", "type": dataset_type}],
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 128,
        "micro_batch_size": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "dataset_num_proc": 1,
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_chat_template_type_renders_with_the_tokenizers_template(
    tiny_model_dir, tmp_path
):
    from axolotl_prefalign.integrations.axolotl.eval_pairs import load_pairs

    rows = [
        {
            "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
            "chosen": str(i + 1),
            "rejected": str(i + 2),
        }
        for i in range(3)
    ]
    cfg = _pairs_cfg(tmp_path, tiny_model_dir, rows, "chat_template.default")
    pairs = load_pairs(cfg, "train[1:]")
    assert pairs == [
        (_turn(f"What is {i} + 1?"), f"{i + 1}<|im_end|>", f"{i + 2}<|im_end|>")
        for i in (1, 2)
    ]


def test_dict_type_renders_its_own_columns_and_formats(tiny_model_dir, tmp_path):
    from axolotl_prefalign.integrations.axolotl.eval_pairs import load_pairs

    rows = [
        {"question": f"What is {i} + 1?", "good": str(i + 1), "bad": str(i + 2)}
        for i in range(3)
    ]
    dict_type = {
        "field_prompt": "question",
        "field_chosen": "good",
        "field_rejected": "bad",
        "prompt_format": "Q: {prompt}\nA:",
        "chosen_format": " {chosen}",
        "rejected_format": " {rejected}",
    }
    cfg = _pairs_cfg(tmp_path, tiny_model_dir, rows, dict_type)
    pairs = load_pairs(cfg, "train[:2]")
    assert pairs == [
        (f"Q: What is {i} + 1?\nA:", f" {i + 1}<|im_end|>", f" {i + 2}<|im_end|>")
        for i in (0, 1)
    ]
