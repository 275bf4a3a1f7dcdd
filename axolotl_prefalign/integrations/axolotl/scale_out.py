"""Register-time checks of an Axolotl YAML's DeepSpeed / FSDP settings against the
fused log-prob path: FSDP1 and ZeRO-3 with `lora_modules_to_save: [lm_head]` stop
before the model loads, with the key and the fix (ZeRO-3 and FSDP2 train)."""

from __future__ import annotations

from ...core.config import PrefAlignConfigError
from ...core.sharding import fsdp1_message, head_entry, is_zero3, zero3_head_message


def default_fsdp_version() -> int:
    """The FSDP version Axolotl gives an `fsdp_config` without one: 1 up to 0.20
    (its validator pins it), 2 from 0.21 (the schema's default; FSDP1 is gone)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    return AxolotlInputConfig.model_fields["fsdp_version"].default or 1


def fsdp_setting(cfg: dict) -> tuple[str, int] | None:
    """(the setting that picks the FSDP version, that version), None without FSDP."""
    fsdp_config = cfg.get("fsdp_config") or {}
    if not cfg.get("fsdp") and not fsdp_config:
        return None
    for key, value in (
        ("fsdp_version", cfg.get("fsdp_version")),
        ("fsdp_config.fsdp_version", fsdp_config.get("fsdp_version")),
        ("fsdp_config.version", fsdp_config.get("version")),
    ):
        if value is not None:
            return f"{key}: {value}", int(value)
    key = "fsdp_config" if fsdp_config else f"fsdp: {cfg.get('fsdp')}"
    version = default_fsdp_version()
    return f"{key} without fsdp_version (Axolotl's default: {version})", version


def check_scale_out(cfg: dict) -> None:
    """Stop a config the fused log-prob path cannot train under its sharding."""
    found = fsdp_setting(cfg)
    if found is not None and found[1] != 2:
        raise PrefAlignConfigError(
            fsdp1_message(found[0], "set fsdp_version: 2 (with an fsdp_config: block)")
        )
    head = head_entry(cfg.get("lora_modules_to_save"))
    if head is not None and cfg.get("adapter") and is_zero3(cfg.get("deepspeed")):
        raise PrefAlignConfigError(
            zero3_head_message(
                cfg.get("deepspeed"),
                "lora_modules_to_save",
                head,
                "train the head fully (no adapter) or remove it from "
                "lora_modules_to_save",
            )
        )
