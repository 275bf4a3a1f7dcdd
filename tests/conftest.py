"""Shared fixtures: a tiny random Llama and a small BPE tokenizer built locally.

Nothing here touches the network; every model is built in seconds from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Question: What is the capital of France? Answer: Paris is the capital.",
    "Instruction: answer accurately; the negative answer is a wrong example.",
    "Negative answer: The capital is Berlin. Positive answer: The capital is Paris.",
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 10 42 3.14",
    "A B C D (A) (B) (C) (D) Answer: B. The answer is C. Let's think step by step.",
    "user assistant system hello world good bad wrong right yes no true false",
    "指令 问题 消极回答 积极回答 北京 巴黎 首都",
] * 20


def build_tiny_tokenizer(path: Path):
    """Train a small byte-level BPE with ChatML special tokens and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, **config):
    """A 2-layer random Llama small enough to train on the CPU in seconds; `config`
    overrides its LlamaConfig settings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **settings | config))


def build_tiny_llama(path: Path, vocab_size: int, seed: int = 0):
    """`tiny_llama`, saved to `path` (HF format)."""
    model = tiny_llama(vocab_size, seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Llama and its tokenizer (HF format)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer(path)
    build_tiny_llama(path, vocab_size=len(tok))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, prepared once (skips if not installed)."""
    from axolotl_prefalign.core.models import DefaultModelError, prepare_default_model

    try:
        return prepare_default_model()
    except DefaultModelError as err:  # pragma: no cover - depends on the machine
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def offline_subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a CPU-only, offline child process that imports this repo."""
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run_axolotl(command: str, cfg: dict, workdir: Path, timeout: int = 600):
    """Write `cfg` as YAML and run `axolotl COMMAND` in a subprocess on the CPU.

    Returns the CompletedProcess; a run past `timeout` fails the test (never a hang).
    """
    import subprocess
    import sys

    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = offline_subprocess_env()
    # `axolotl train` launches accelerate from PATH: use the venv's bin.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        [str(Path(bin_dir) / "axolotl"), command, str(path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_axolotl_train(cfg: dict, workdir: Path, timeout: int = 600):
    """`axolotl train` on `cfg` (see run_axolotl); output is printed on failure."""
    proc = run_axolotl("train", cfg, workdir, timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        print(proc.stderr[-6000:])
    return proc


def tiny_train_cfg(model_dir: Path, out_dir: Path, **extra) -> dict:
    """A minimal CPU training config for the tiny model (a few steps)."""
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "sequence_len": 128,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "output_dir": str(out_dir),
        "dataset_prepared_path": str(out_dir / "prepared"),
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 1,
    }
    cfg.update(extra)
    return cfg


def side_env_python(
    python: str, probe: str, *, missing: str, broken: str, require: str, build: str
) -> str:
    """`python` of an environment beside the project's (LLaMA-Factory's, TRL 1.16's)
    if it runs `probe`; else skip, or fail where the `require` variable is 1 (CI
    builds those environments). `missing` / `broken` name it in the message."""
    import subprocess

    problem = None
    if not Path(python).exists():
        problem = f"no {missing} at {python}"
    else:
        run = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if run.returncode != 0:
            problem = f"{python} {broken}: {run.stderr[-300:]}"
    if problem:
        if os.environ.get(require) == "1":
            pytest.fail(f"{problem} ({require}=1)")
        pytest.skip(f"{problem} (bash {build})")
    return python


def llamafactory_python() -> str:
    """The Python of the LLaMA-Factory environment (tests/llamafactory_env.sh).

    Without one the LLaMA-Factory tests skip, except where
    PREFALIGN_REQUIRE_LLAMAFACTORY=1 (CI builds the environment): then they fail.
    """
    return side_env_python(
        os.environ.get("PREFALIGN_LLAMAFACTORY_PYTHON", "/tmp/lf-venv/bin/python"),
        "import llamafactory.data, axolotl_prefalign",
        missing="LLaMA-Factory environment",
        broken="cannot import llamafactory",
        require="PREFALIGN_REQUIRE_LLAMAFACTORY",
        build="tests/llamafactory_env.sh",
    )


# -- one real SPA loop, shared ---------------------------------------------------------

SPA_SEED = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin"},
    {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
    {"prompt": "Colour of grass?", "chosen": "green", "rejected": "blue"},
]
SPA_GOLD_OPTIONS = ["Paris", "London", "Berlin", "Madrid"]


@pytest.fixture(scope="session")
def spa_real_loop(tmp_path_factory, tiny_model_dir):
    """`axolotl prefalign spa` run once for real (seed DPO + 2 iterations of
    `axolotl train` / `merge-lora` / `spa-expand` subprocesses on the tiny model),
    on prompts with gold answers; the loop and gold tests each check their part of
    it. Returns a namespace: out, cmd, env, cwd, seed, prompts, proc."""
    import json
    import subprocess
    import sys
    import types

    import yaml

    tmp = tmp_path_factory.mktemp("spa-real-loop")
    seed = tmp / "seed.jsonl"
    seed.write_text("".join(json.dumps(r) + "\n" for r in SPA_SEED))
    prompts = tmp / "mc.jsonl"
    gold = [
        {"q": f"Question {k}?", "answer": "ABCD"[k % 4], "choices": SPA_GOLD_OPTIONS}
        for k in range(6)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in gold))
    source = {
        "path": str(prompts),
        "field": "q",
        "gold_field": "answer",
        "gold_options_field": "choices",
    }
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {
            "loss": "spa",
            "fused_logprobs": True,
            "spa": {
                "iterations": 2,
                "seed_epochs": 1,
                "max_new_tokens": 8,
                "prompts": [source],
                "prompts_per_iteration": [3, 3],
            },
        },
        "rl": "dpo",
        "datasets": [
            {
                "path": str(seed),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],
        "output_dir": str(tmp / "out"),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "epoch",
        "sequence_len": 256,
        "bf16": False,
        "fp16": False,
        "tf32": False,
    }
    path = tmp / "spa.yml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "axolotl.cli.main", "prefalign", "spa", str(path)]
    proc = subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900
    )
    return types.SimpleNamespace(
        out=tmp / "out", cmd=cmd, env=env, cwd=tmp, seed=seed, prompts=prompts,
        proc=proc,
    )  # fmt: skip
