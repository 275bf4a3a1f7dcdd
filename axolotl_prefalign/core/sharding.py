"""Which sharding a training config asks for, and the two set-ups the fused log-prob
path cannot run: FSDP1, and ZeRO-3 with a PEFT copy of the output head.

The frameworks spell the settings differently (integrations/*/scale_out.py read
their keys); the reading of a DeepSpeed config and the messages are shared here.
"""

from __future__ import annotations

import json
import os
from typing import Any

# Names a model's output head has (Axolotl's `get_linear_embedding_layers`).
OUTPUT_HEADS = ("lm_head", "embed_out")

DEEPSPEED_ISSUE = (
    "'Linear' object has no attribute 'ds_grads_remaining', DeepSpeed issue #7203"
)


def deepspeed_dict(value: Any) -> dict | None:
    """The DeepSpeed config a `deepspeed:` value gives: a mapping as is, a path
    (relative to the working directory, as the trainers open it) read as JSON;
    None when there is none or it cannot be read here (the trainer then says so)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not os.path.isfile(value):
        return None
    try:
        with open(value, encoding="utf-8") as fh:
            loaded = json.load(fh)
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def is_zero3(value: Any) -> bool:
    """Whether a `deepspeed:` value selects ZeRO stage 3. A path that does not exist
    here counts by its name (`zero3` in it), as Axolotl itself reads one."""
    config = deepspeed_dict(value)
    if config is None:
        return isinstance(value, str) and "zero3" in os.path.basename(value)
    stage = (config.get("zero_optimization") or {}).get("stage")
    return str(stage) == "3"


def head_entry(names: Any) -> str | None:
    """The entry of a modules-to-save list (or comma-separated string) that names
    the output head, if any."""
    if isinstance(names, str):
        names = names.split(",")
    return next(
        (
            str(n).strip()
            for n in names or []
            if str(n).split(".")[-1].strip() in OUTPUT_HEADS
        ),
        None,
    )


def fsdp1_message(setting: str, fix: str) -> str:
    """One line: FSDP1 under the fused path, the setting that asks for it, the fix."""
    return (
        f"{setting} selects FSDP1, whose flat parameters leave prefalign's fused "
        f"log-prob path an empty lm_head; {fix}, or use DeepSpeed ZeRO-3"
    )


def zero3_head_message(deepspeed: Any, head_key: str, head: str, fix: str) -> str:
    """One line: ZeRO-3 with the head in modules_to_save, both keys, the fix."""
    what = "a ZeRO stage 3 config" if isinstance(deepspeed, dict) else str(deepspeed)
    return (
        f"deepspeed: {what} (ZeRO stage 3) with {head_key}: {head} fails inside "
        f"DeepSpeed on the first forward ({DEEPSPEED_ISSUE}); {fix}, or use a "
        "ZeRO stage 2 config"
    )
