"""Launch-time checks of a LLaMA-Factory DPO run's DeepSpeed / FSDP settings against
the fused log-prob path: FSDP1 (from `accelerate launch --config_file` or the YAML's
`fsdp:` keys) and ZeRO-3 with `additional_target: lm_head` stop before the model
loads, with the setting and the fix (ZeRO-3 and FSDP2 train)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...core.config import PrefAlignConfigError
from ...core.sharding import fsdp1_message, head_entry, is_zero3, zero3_head_message


def fsdp_setting(args: dict[str, Any], env: Mapping[str, str]) -> tuple[str, str]:
    """(the setting that picks the FSDP version, that version); ("", "") without
    FSDP. accelerate's config reaches the process as ACCELERATE_USE_FSDP and
    FSDP_VERSION; the YAML's `fsdp:` / `fsdp_config:` are transformers' own."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        return (
            f"the accelerate config of this launch (FSDP_VERSION={version}; "
            "fsdp_version missing or 1 in its fsdp_config)",
            version,
        )
    if not args.get("fsdp"):
        return "", ""
    fsdp_config = args.get("fsdp_config") or {}
    if not isinstance(fsdp_config, dict):
        return "", ""  # a JSON path: transformers reads it, FSDP1 fails at step 1
    for key in ("version", "fsdp_version"):
        if fsdp_config.get(key) is not None:
            return f"fsdp_config.{key}: {fsdp_config[key]}", str(fsdp_config[key])
    return "fsdp_config without version (transformers' default: 1)", "1"


def check_scale_out(args: dict[str, Any], env: Mapping[str, str]) -> None:
    """Stop a DPO run the fused log-prob path cannot train under its sharding."""
    setting, version = fsdp_setting(args, env)
    if setting and version != "2":
        fix = (
            "set fsdp_version: 2 in that file's fsdp_config"
            if setting.startswith("the accelerate")
            else "set fsdp_config: {version: 2}"
        )
        raise PrefAlignConfigError(fsdp1_message(setting, fix))
    head = head_entry(args.get("additional_target"))
    lora = args.get("finetuning_type", "lora") == "lora"
    if head is not None and lora and is_zero3(args.get("deepspeed")):
        raise PrefAlignConfigError(
            zero3_head_message(
                args.get("deepspeed"),
                "additional_target",
                head,
                "train the head fully (finetuning_type: full) or remove it from "
                "additional_target",
            )
        )
