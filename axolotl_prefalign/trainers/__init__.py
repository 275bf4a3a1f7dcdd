"""The `trainer_cls:` paths a YAML may name: `axolotl_prefalign.trainers.<Name>`.

A door kept for YAML written before the layout move (the plugin installs these
itself); the classes live in `integrations/axolotl/trainers/`. Imported lazily:
Axolotl resolves the path with getattr.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrefAlignDPOTrainer": "..integrations.axolotl.trainers.dpo",
    "ContrastSFTTrainer": "..integrations.axolotl.trainers.contrast_sft",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
