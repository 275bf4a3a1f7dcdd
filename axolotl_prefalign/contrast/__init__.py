"""Plaintext contrast SFT: a preference pair as one SFT example.

The method: docs/methods.md#contrast.

`format` renders, tokenizes and masks rows (framework-neutral); `preview` prints
rows with their loss spans marked. `type: axolotl_prefalign.contrast` on an Axolotl
SFT dataset entry reaches `load` below, the one door into Axolotl's side
(`integrations/axolotl/contrast.py`).
"""

from __future__ import annotations

from typing import Any

from .format import (
    IGNORE_INDEX,
    NEGATIVE_LABELS,
    PRESETS,
    TYPE_NAME,
    ContrastFormat,
    ContrastPair,
    EncodedRow,
    RowProblem,
    build_inference_prompt,
    is_positive_only,
    parse_row,
)
from .preview import print_preview, render_marked

__all__ = [
    "IGNORE_INDEX",
    "NEGATIVE_LABELS",
    "PRESETS",
    "TYPE_NAME",
    "ContrastFormat",
    "ContrastPair",
    "EncodedRow",
    "RowProblem",
    "build_inference_prompt",
    "is_positive_only",
    "load",
    "parse_row",
    "print_preview",
    "render_marked",
]


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> ContrastFormat:
    """Axolotl's SFT dataset-type hook for `type: axolotl_prefalign.contrast`."""
    from ..integrations.axolotl.contrast import load as axolotl_load

    return axolotl_load(tokenizer, cfg, ds_cfg)
