"""Trainer classes installed through `trainer_cls:` by the plugin.

Imported lazily: Axolotl resolves `axolotl_prefalign.trainers.<Name>` with getattr.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PrefAlignDPOTrainer": ".dpo",
    "ContrastSFTTrainer": ".contrast_sft",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
