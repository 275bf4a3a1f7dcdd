"""SPA — Spread Preference Annotation (Kim et al., ICLR 2025; METHODS.md §1).

`pairs` is the DPO dataset type, `judge` the implicit-reward judgment, `expand` one
iteration's sampling + judging, `loop` the seed → expand → train orchestration.
"""

from __future__ import annotations

__all__ = [
    "expand",
    "expand_from_config",
    "judge_pairs",
    "run_from_config",
    "spa_pairs",
]


def __getattr__(name: str):
    # Lazy: `import axolotl_prefalign.spa` must not pull in torch or Axolotl.
    if name == "spa_pairs":
        from .pairs import spa_pairs

        return spa_pairs
    if name == "judge_pairs":
        from .judge import judge_pairs

        return judge_pairs
    if name == "expand":
        from .expand import expand

        return expand
    if name in ("expand_from_config", "run_from_config"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'axolotl_prefalign.spa' has no attribute {name!r}")
