"""The models the SPA judge compares: where π_{i−1} and π_init come from (the
loop's layout, or a given model folder) and how they are loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpaLoopError
from .layout import has_weights, iter_dir


def is_adapter_run(cfg: Any) -> bool:
    """True when the YAML trains a LoRA/QLoRA adapter."""
    return cfg.get("adapter") in ("lora", "qlora")


def original_base(cfg: Any) -> str:
    """π_init: the YAML's base model (the SFT model), resolved once."""
    from ..core.models import DEFAULT_MODEL_ALIAS, resolve_model_path

    base = cfg.get("base_model")
    if base == DEFAULT_MODEL_ALIAS:
        base = resolve_model_path(None)
    return absolute(base)


def absolute(path: str) -> str:
    """`path` resolved when it exists here (a folder), else as given (a hub id)."""
    p = Path(str(path)).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


@dataclass
class PolicySpec:
    """How to load π_{i−1} and π_init for judging (paths only, nothing loaded)."""

    base: str
    adapters: list[str] = field(default_factory=list)
    init_path: str | None = None  # None: π_init = the adapters disabled
    vllm_path: str | None = None

    @property
    def model_id(self) -> str:
        return self.base + "".join(f" + {a}" for a in self.adapters)

    @property
    def init_id(self) -> str:
        return self.init_path or "adapter-disabled"


def policy_spec(cfg: Any, iteration: int, model_path: str | None = None) -> PolicySpec:
    """Where π_{iteration−1} and π_init come from (the loop's layout, or --model)."""
    from ..core.config import prefalign_config

    spa = prefalign_config(cfg).spa
    base = original_base(cfg)
    init = absolute(spa.init_model) if spa.init_model else None
    if model_path:
        path = Path(model_path)
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.exists():
            on = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            on = absolute(on)
            if init is None and on != base:
                init = base
            return PolicySpec(on, [absolute(str(path))], init)
        return PolicySpec(absolute(str(path)), [], init or base, absolute(str(path)))
    out = Path(cfg.get("output_dir"))
    if is_adapter_run(cfg):
        dirs = [iter_dir(out, k) for k in range(iteration)]
        for d in dirs:
            if not (d / "adapter_config.json").exists():
                raise SpaLoopError(
                    f"π_{iteration - 1} not found: {d} holds no adapter; run the "
                    "earlier stages (axolotl prefalign spa) or pass --model"
                )
        merged = iter_dir(out, iteration - 1) / "merged"
        vllm = str(merged.resolve()) if has_weights(merged) else None
        return PolicySpec(base, [str(d.resolve()) for d in dirs], init, vllm)
    prev = iter_dir(out, iteration - 1)
    if not has_weights(prev):
        raise SpaLoopError(
            f"π_{iteration - 1} not found: {prev} holds no model; run the earlier "
            "stages (axolotl prefalign spa) or pass --model"
        )
    return PolicySpec(str(prev.resolve()), [], init or base, str(prev.resolve()))


def _load_causal_lm(path: str, cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.float32
    if cuda and cfg.get("bf16") in (True, "auto") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif cuda and cfg.get("fp16"):
        dtype = torch.float16
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": bool(cfg.get("trust_remote_code")),
    }
    # Same quantisation as training (QLoRA: NF4); on the CPU plain weights.
    if cuda and (cfg.get("load_in_4bit") or cfg.get("adapter") == "qlora"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0}
    elif cuda and cfg.get("load_in_8bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to("cuda" if cuda else "cpu")
    return model.eval()


def load_policy(spec: PolicySpec, cfg: Any) -> tuple[Any, Any]:
    """(π_{i−1}, π_init or None when π_init = π_{i−1} with its adapters disabled)."""
    model = _load_causal_lm(spec.base, cfg)
    if spec.adapters:
        from peft import PeftModel

        names = [f"a{k}" for k in range(len(spec.adapters))]
        model = PeftModel.from_pretrained(
            model, spec.adapters[0], adapter_name=names[0]
        )
        for name, path in zip(names[1:], spec.adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
        if len(names) > 1:
            # All active at once: W_init + Σ_k ΔW_k = π_{i−1} (merges are additive).
            model.base_model.set_adapter(names, inference_mode=True)
        model.eval()
    init = _load_causal_lm(spec.init_path, cfg) if spec.init_path else None
    return model, init
