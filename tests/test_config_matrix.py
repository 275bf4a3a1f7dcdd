"""Every DPO dataset `type:` the installed Axolotl ships, end to end without a
subprocess: rows in the columns the type reads, rendered by Axolotl's own RL
dataset loader (the path `prefalign eval-pairs` uses), one optimizer step of the
plugin's DPO trainer, eval-pairs' margins, and the model card naming the type.

The types are read from `axolotl.prompt_strategies.dpo` when the tests are
collected, so a type a new Axolotl release adds joins the matrix by itself.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("axolotl.prompt_strategies.dpo")

QUESTIONS = (
    "What is the capital of France?",
    "Add 2 and 3.",
    "Say yes.",
    "Is fire hot?",
)
GOOD = ("Paris.", "5", "yes", "true")
BAD = ("Berlin is it.", "6 or 7", "no no no", "false, it is cold.")
SYSTEM = "Answer briefly."
NO_TYPE = "no-type"  # an entry without `type:`: rows used as they are
# A dict `type:`: Axolotl runs it as user_defined.default, on columns of its own.
USER_DEFINED = {
    "field_prompt": "question",
    "field_system": "context",
    "field_chosen": "good",
    "field_rejected": "bad",
    "prompt_format": "{system}\nQuestion: {prompt}\nAnswer:",
    "chosen_format": " {chosen}",
    "rejected_format": " {rejected}",
}


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


# One row builder per family of input columns: (question, good, bad) -> row.
ROW_BUILDERS: dict[str, Callable[[str, str, str], dict[str, Any]]] = {
    "prompt": lambda q, g, b: {
        "system": SYSTEM,
        "prompt": q,
        "chosen": g,
        "rejected": b,
    },
    "input": lambda q, g, b: {"system": SYSTEM, "input": q, "chosen": g, "rejected": b},
    "question": lambda q, g, b: {
        "system": SYSTEM,
        "question": q,
        "chosen": g,
        "rejected": b,
    },
    "messages": lambda q, g, b: {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
        ],
        "chosen": g,
        "rejected": b,
    },
    "conversation": lambda q, g, b: {
        "prompt": q,
        "chosen": _turns(q, g),
        "rejected": _turns(q, b),
    },
    # zephyr.nectar takes the answer with the highest `rank` value as chosen.
    "ranked": lambda q, g, b: {
        "prompt": q,
        "answers": [{"answer": b, "rank": 1}, {"answer": g, "rank": 2}],
    },
    "custom": lambda q, g, b: {"context": SYSTEM, "question": q, "good": g, "bad": b},
}
# The chatml and llama3 modules hold the same strategies in two prompt formats.
FORMAT_FAMILIES = {
    "default": "prompt",
    "prompt_pairs": "prompt",
    "icr": "input",
    "intel": "question",
    "argilla_chat": "conversation",
    "ultra": "conversation",
}
# The column family each type this matrix knows reads; any other type tries every
# family and is skipped, naming each error, when none renders it.
FAMILY_BY_TYPE = {
    **{
        f"{fmt}.{name}": f
        for fmt in ("chatml", "llama3")
        for name, f in FORMAT_FAMILIES.items()
    },
    "chat_template.default": "messages",
    "chat_template.argilla_chat": "conversation",
    "passthrough.default": "prompt",
    "user_defined.default": "custom",  # run as a dict `type:`, the only way it runs
    "zephyr.nectar": "ranked",
    NO_TYPE: "prompt",
}


def axolotl_dpo_types() -> list[str]:
    """`module.strategy` for each DPO type loader in the installed Axolotl."""
    package = importlib.import_module("axolotl.prompt_strategies.dpo")
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            params = list(inspect.signature(fn).parameters)
            if fn.__module__ == module.__name__ and not name.startswith("_"):
                if params and params[0] == "cfg":  # a loader: fn(cfg, **kwargs)
                    found.append(f"{info.name}.{name}")
    return sorted(found)


TYPES = axolotl_dpo_types()


def _type_value(type_name: str) -> Any:
    if type_name == "user_defined.default":
        return USER_DEFINED
    return None if type_name == NO_TYPE else type_name


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """One JSONL file of four pairs per column family."""
    root = tmp_path_factory.mktemp("matrix-data")
    files = {}
    for family, build in ROW_BUILDERS.items():
        rows = [build(*qgb) for qgb in zip(QUESTIONS, GOOD, BAD, strict=True)]
        files[family] = root / f"{family}.jsonl"
        files[family].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def _load_cfg(tmp_path: Path, model_dir: Path, data: Path, type_value: Any):
    """Axolotl's validated config of a DPO run on `data` (as eval-pairs loads it)."""
    from axolotl_prefalign.cli import load_config

    entry: dict[str, Any] = {"path": str(data), "ds_type": "json", "split": "train"}
    if type_value is not None:
        entry["type"] = type_value
    raw = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {"loss": "sigmoid"},
        "rl": "dpo",
        "rl_beta": 0.1,
        "adapter": "lora",
        "datasets": [entry],
        "output_dir": str(tmp_path / "out"),
        # the tiny tokenizer spells Llama 3's header tokens in many pieces
        "sequence_len": 512,
        "micro_batch_size": 4,
        "learning_rate": 1e-3,
        "num_epochs": 1,
        # one process: a map over four rows costs less than starting a second
        "dataset_num_proc": 1,
        # no copy of the prepared rows on disk (seconds a case); the rendering is
        # the same (the length filter is Axolotl's, exercised by test_eval_pairs)
        "skip_prepare_dataset": True,
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


def _render(tmp_path, model_dir, data_files, type_name):
    """(cfg, rows) rendered through Axolotl's RL loader; unknown types try every
    column family and skip, naming each error, when none fits."""
    from axolotl_prefalign.integrations.axolotl.eval_pairs import preference_dataset

    family = FAMILY_BY_TYPE.get(type_name)
    tried = [family] if family else list(ROW_BUILDERS)
    errors = []
    for name in tried:
        cfg = _load_cfg(tmp_path, model_dir, data_files[name], _type_value(type_name))
        try:
            return cfg, preference_dataset(cfg, "train")
        except Exception as err:  # noqa: BLE001 - an unknown type's columns
            if family:
                raise
            errors.append(f"{name}: {type(err).__name__}: {str(err)[:160]}")
    pytest.skip(
        f"{type_name}: a type this matrix has no row builder for, and no column "
        f"family renders it ({'; '.join(errors)}); add its columns to ROW_BUILDERS"
    )


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The plugin's DPO trainer on a tiny LoRA model, built once for the module;
    each case hands it its own rows."""
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.integrations.axolotl.trainers.dpo import PrefAlignDPOTrainer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    args = AxolotlDPOConfig(
        output_dir=str(tmp_path_factory.mktemp("matrix-out")),
        per_device_train_batch_size=4,
        beta=0.1,
        max_length=512,
        learning_rate=1e-3,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,
        max_steps=1,
    )
    rows = [
        {"prompt": q, "chosen": g, "rejected": b}
        for q, g, b in zip(QUESTIONS, GOOD, BAD, strict=True)
    ]
    trainer = PrefAlignDPOTrainer(
        model,
        None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
        prefalign=PrefAlignConfig.from_raw({"loss": "sigmoid"}),
    )
    trainer.create_optimizer()
    return trainer


def _one_step(trainer, rows) -> tuple[torch.Tensor, Any]:
    """Tokenise `rows` as the trainer tokenises its dataset, then one optimizer
    step on them; returns the loss and the tokenised rows."""
    tokenized = trainer._prepare_dataset(
        rows, trainer.processing_class, trainer.args, "train"
    )
    trainer.train_dataset = tokenized
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return loss, tokenized


@pytest.mark.parametrize("type_name", [*TYPES, NO_TYPE])
def test_each_dpo_type_trains_scores_and_is_named_on_the_card(
    type_name, trainer, tiny_model_dir, data_files, tmp_path
):
    from axolotl_prefalign.core.model_card import dataset_type_label, render_card
    from axolotl_prefalign.integrations.axolotl.eval_pairs import (
        pair_margins,
        pair_texts,
    )
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec
    from axolotl_prefalign.spa.judge import encode_like_trl

    cfg, rows = _render(tmp_path, tiny_model_dir, data_files, type_name)
    tok = trainer.processing_class
    pairs = pair_texts(rows, tok)
    assert len(pairs) == len(QUESTIONS)
    for (prompt, chosen, rejected), q, g, b in zip(
        pairs, QUESTIONS, GOOD, BAD, strict=True
    ):
        assert q in prompt and g in chosen and b in rejected, (prompt, chosen, rejected)
        assert b not in chosen and g not in rejected

    # (a) one optimizer step of the fused trainer
    lora = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if p.requires_grad
    }
    loss, tokenized = _one_step(trainer, rows)
    assert torch.isfinite(loss), loss
    moved = [
        n
        for n, p in trainer.model.named_parameters()
        if n in lora and not torch.equal(p, lora[n])
    ]
    assert moved, "the optimizer step changed no LoRA weight"

    # (b) eval-pairs scores each pair, tokenised exactly as the trainer did
    for (prompt, chosen, rejected), row in zip(pairs, tokenized, strict=True):
        assert encode_like_trl(tok, prompt, chosen) == (
            row["prompt_ids"],
            row["chosen_ids"],
        )
        assert encode_like_trl(tok, prompt, rejected)[1] == row["rejected_ids"]
    margins = pair_margins(trainer.model.eval(), tok, pairs)
    assert len(margins) == len(QUESTIONS) and all(math.isfinite(m) for m in margins)

    # (c) the card renders from Axolotl's own config and names the type
    text = render_card(build_spec(cfg, trainer))
    assert f"`{dataset_type_label(_type_value(type_name))}`" in text
    assert "fine-tuned version of [None]" not in text
