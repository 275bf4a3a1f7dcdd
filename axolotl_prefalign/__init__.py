"""axolotl_prefalign: preference alignment with little or noisy labels.

Floors, imported downward only (docs/architecture.md): `core/` (log-prob path,
losses, the framework-neutral preference step, rows and local data, config), the
methods `contrast/`, `spa/`, `robustft/`, then `integrations/axolotl/` and
`integrations/llamafactory/`, then `cli`. `plugins: [axolotl_prefalign.PrefAlignPlugin]`
enables the Axolotl plugin. The names a YAML writes (`PrefAlignPlugin`, `spa_pairs`,
the `contrast` and `robustft` types, `trainers.*`) are doors kept here and in the
method packages. Heavy imports (torch, Axolotl) are deferred so that
`prefalign --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PrefAlignPlugin", "spa_pairs", "__version__"]


def spa_pairs(cfg: Any, **kwargs: Any):
    """DPO dataset type `axolotl_prefalign.spa_pairs` (Axolotl resolves DPO types
    only as `<top_module>.<function>`, so it lives on the package itself)."""
    from .integrations.axolotl.spa_pairs import spa_pairs as _spa_pairs

    return _spa_pairs(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "PrefAlignPlugin":
        from .integrations.axolotl.plugin import PrefAlignPlugin

        return PrefAlignPlugin
    raise AttributeError(f"module 'axolotl_prefalign' has no attribute {name!r}")
