"""axolotl_prefalign: preference alignment with little or noisy labels, for Axolotl.

`plugins: [axolotl_prefalign.PrefAlignPlugin]` enables it. Heavy imports (torch,
Axolotl) are deferred so that `prefalign --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PrefAlignPlugin", "spa_pairs", "__version__"]


def spa_pairs(cfg: Any, **kwargs: Any):
    """DPO dataset type `axolotl_prefalign.spa_pairs` (Axolotl resolves DPO types
    only as `<top_module>.<function>`, so it lives on the package itself)."""
    from .spa.pairs import spa_pairs as _spa_pairs

    return _spa_pairs(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "PrefAlignPlugin":
        from .plugin import PrefAlignPlugin

        return PrefAlignPlugin
    raise AttributeError(f"module 'axolotl_prefalign' has no attribute {name!r}")
