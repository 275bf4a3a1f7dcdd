"""SPA — Spread Preference Annotation (Kim et al., ICLR 2025; docs/methods.md#spa).

`pairs` normalises and renders preference pairs, `judge` the implicit-reward
judgment, `expand` one iteration's sampling + judging, `gold` the self-labels and
noise flags against gold answers; the framework-neutral parts of the seed → expand
→ train orchestration: `settings` (what each setting affects), `prompts`, `policy`,
`layout`, `stages` (resumable stages), `report` (statistics) and `loop`. The DPO
dataset type `axolotl_prefalign.spa_pairs` and the Axolotl runs of the loop live in
`integrations/axolotl/`.
"""

from __future__ import annotations

__all__ = ["expand", "judge_pairs"]


def __getattr__(name: str):
    # Lazy: `import axolotl_prefalign.spa` must not pull in torch.
    if name == "judge_pairs":
        from .judge import judge_pairs

        return judge_pairs
    if name == "expand":
        from .expand import expand

        return expand
    raise AttributeError(f"module 'axolotl_prefalign.spa' has no attribute {name!r}")
