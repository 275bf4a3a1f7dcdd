"""What the benchmarks build and run on: one definition each, shared by all of them.

The environment defaults, the Llama-3 shapes, the random-weight QLoRA base (decoder
linears swapped for bitsandbytes NF4), the LoRA adapter, the one-token-per-word
tokenizer with exact-length preference pairs, and the record of the machine.
gpu_check, gpu_dpo_24gb, dpo_step, contrast_vs_dpo and the memory predictions
import these, so that they measure the same model on the same data.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, MutableMapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GIB = 2**30


def write_report(path: Path, report: dict) -> Path:
    """`report` as indented JSON at `path` (folders made; values JSON lacks as str)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


# -- environment -------------------------------------------------------------------
# Offline (no hub or dataset downloads), no telemetry, quiet tokenizer threads.
ENV_DEFAULTS = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_env_defaults(
    env: MutableMapping[str, str] | None = None, *, one_thread: bool = False
) -> MutableMapping[str, str]:
    """ENV_DEFAULTS (and one BLAS thread) where unset, in `env` or os.environ.

    One thread: the small CPU shapes only wait on a second one when other
    processes share the cores. Set before torch is imported to take effect."""
    env = os.environ if env is None else env
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    if one_thread:
        for key in THREAD_VARS:
            env.setdefault(key, "1")
    return env


# -- shapes ------------------------------------------------------------------------
LLAMA3_8B_WIDTH = {
    "vocab": 128256,
    "hidden": 4096,
    "heads": 32,
    "kv_heads": 8,
    "intermediate": 14336,
}
LLAMA3_8B = {**LLAMA3_8B_WIDTH, "layers": 32}
# Llama-3-70B (and 3.1/3.3-70B): 80 layers of this width.
LLAMA3_70B_WIDTH = {
    "vocab": 128256,
    "hidden": 8192,
    "heads": 64,
    "kv_heads": 8,
    "intermediate": 28672,
}
# The CPU stand-in for the 8B shape: every code path, seconds per step.
TINY_LLAMA = {
    "vocab": 1024,
    "hidden": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 256,
}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, no sparsity).
# First substring match of torch.cuda.get_device_name() wins, so order matters.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def llama_config(spec: dict):
    """A LlamaConfig with the spec's shapes and Llama-3's RoPE/norm settings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=max(8192, spec["seq"]),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )


def flops_params(spec: dict) -> int:
    """N for 6·N·tokens: every matmul weight a token passes (decoder linears and
    lm_head); the input embedding is a lookup, norms are negligible."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = spec["kv_heads"] * (h // spec["heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return spec["layers"] * per_layer + spec["vocab"] * h


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a known GPU, else None (MFU is then omitted)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def gpu_properties() -> dict:
    """GPU 0's name, memory, compute capability, SM count and bf16 peak."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "total_memory_gib": props.total_memory / GIB,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "peak_bf16_tflops": peak_tflops(props.name),
    }


# -- the QLoRA model -----------------------------------------------------------------
def _params4bit(weight, module):
    """The NF4 weight bitsandbytes makes: Params4bit quantizes when moved to a real
    device (here: where the bf16 weight already is)."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        compress_statistics=False,
        quant_type="nf4",
        module=module,
    ).to(weight.device)


def quantize_linears_nf4(
    model, compute_dtype, nf4_weight: Callable | None = None
) -> int:
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit, in place.

    What `from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4"))` gives, without a checkpoint: `from_config` takes no
    quantization_config. lm_head stays a plain Linear, as transformers keeps it.
    `nf4_weight(bf16 weight, module)` makes each quantized weight (default: a real
    Params4bit; memory_predict passes one for FakeTensorMode).
    """
    import bitsandbytes as bnb
    from torch import nn
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # (parent, name) pairs only: holding the children themselves would keep every
    # bf16 weight alive until the loop ends (8B model: 16 GB bf16 + NF4 at once).
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and name != "lm_head"
    ]
    for parent, name in targets:
        child = getattr(parent, name)
        with unset_fake_temporarily():  # a real meta module, also under fake mode
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=False,  # bnb_4bit_use_double_quant default
                quant_type="nf4",
                device="meta",
            )
        # The bf16 weight is freed once `child` is replaced.
        q.weight = (nf4_weight or _params4bit)(child.weight.data, q)
        if child.bias is not None:
            q.bias = child.bias
        setattr(parent, name, q)
        del child
    return len(targets)


def build_model(
    spec: dict, device: str, dtype, *, nf4: bool = True, nf4_weight=None
) -> tuple:
    """The random-weight QLoRA base: `dtype` on the device, decoder linears in NF4
    (`nf4=False`: left in `dtype`), frozen; returns (model, linears quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            llama_config(spec), dtype=dtype, attn_implementation=spec["attn"]
        )
    n_quantized = quantize_linears_nf4(model, dtype, nf4_weight) if nf4 else 0
    for p in model.parameters():
        p.requires_grad_(False)
    # As after a bitsandbytes load: TRL then keeps the LoRA weights in bf16.
    model.is_loaded_in_4bit = nf4
    return model, n_quantized


def lora_config():
    """LoRA r=16, alpha 32, on every linear layer but lm_head, no dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def lora_for_training(base, dtype, gc_kwargs: dict, accelerator) -> tuple:
    """The QLoRA model as TRL's DPOTrainer + HF Trainer leave it: LoRA r=16
    all-linear, input grads on, trainable params in `dtype` (TRL: QLoRA adapters in
    bf16), gradient checkpointing, train mode, accelerate's autocast wrapper.
    Returns (model, trainable params)."""
    from peft import get_peft_model

    model = get_peft_model(base, lora_config())
    model.enable_input_require_grads()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.train()
    model = accelerator.prepare_model(model, device_placement=False)
    return model, [p for p in model.parameters() if p.requires_grad]


# -- data ----------------------------------------------------------------------------
PROMPT_FRACTION = 0.25  # of each side; the rest is the response (its EOS included)


def word_tokenizer(vocab: int):
    """One token per whitespace word ("t<id>"), so lengths are exact; no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def pair_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Text pairs with prompt+chosen = prompt+rejected = seq tokens (EOS counted)."""
    import random

    rng = random.Random(seed)
    prompt_len = max(1, int(seq * PROMPT_FRACTION))
    response_words = seq - prompt_len - 1  # TRL appends EOS to each response

    def words(k: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(k))

    return [
        {
            "prompt": words(prompt_len),
            "chosen": " " + words(response_words),
            "rejected": " " + words(response_words),
        }
        for _ in range(n)
    ]


# -- the record ----------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Python, torch, CPU, cores and (if any) the GPU this run used."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
