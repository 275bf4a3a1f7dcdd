"""RobustFT: noise-robust SFT data (Luo et al., arXiv 2412.14922).

The method: docs/methods.md#robustft.

`type: axolotl_prefalign.robustft` on an SFT dataset entry trains on the denoised
set D_clean ∪ D_select of that entry (the pipeline runs during preprocessing when
its output does not exist yet); `axolotl prefalign denoise CONFIG` runs it alone.
Stages: `predict` (experts' plain and reasoning-enhanced replies), `answers`
(extraction), `detect` (clean / noisy), `relabel` (retrieval, context-enhanced
answer, review), `select` (lowest entropy, or per-label quotas); `options` (one
named unit per choice setting's value), `stages` and `pipeline` (the resumable run),
`report`, `resolve` (YAML entries to runs). Beyond the paper: `loglik` (option
log-likelihood scoring) and `crossfit` (a LoRA expert cross-fitted on the noisy
labels).
Axolotl's tokenizing strategy lives in `integrations/axolotl/robustft.py`;
`load` below is the door the YAML type reaches.
"""

from __future__ import annotations

from typing import Any


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None):
    """Axolotl's SFT dataset-type hook: a strategy that denoises, then tokenizes."""
    from ..integrations.axolotl.robustft import RobustFTStrategy

    return RobustFTStrategy(tokenizer, cfg, ds_cfg or {})
