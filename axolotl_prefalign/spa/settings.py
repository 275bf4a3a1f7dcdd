"""What each SPA setting affects, read from its declaration beside the field in
`SpaConfig` (`Annotated[type, EXPANSION, TRAINING]`): which settings key an
expansion (a change makes finished ones stale) and which reach the trainer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..core.config import SpaConfig, SpaEffect

EFFECTS = ("expansion", "prompts", "training", "loop")


def setting_effects(model: type[BaseModel] = SpaConfig) -> dict[str, frozenset[str]]:
    """Each field of `model` with the effects declared beside it; a field without
    one (or with an unknown one) is an error that names it and the fix."""
    effects = {}
    for name, info in model.model_fields.items():
        declared = frozenset(m.name for m in info.metadata if isinstance(m, SpaEffect))
        unknown = declared - set(EFFECTS)
        if not declared or unknown:
            raise TypeError(
                f"{model.__name__}.{name}: declare what a change to it affects, "
                f"e.g. `{name}: Annotated[type, EXPANSION] = Field(...)` with one or "
                f"more of {', '.join(e.upper() for e in EFFECTS)} "
                f"(axolotl_prefalign/core/config.py)"
                + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else "")
            )
        effects[name] = declared
    return effects


def settings_affecting(effect: str, model: type[BaseModel] = SpaConfig) -> frozenset:
    """The names of the fields of `model` declared with `effect`."""
    return frozenset(n for n, e in setting_effects(model).items() if effect in e)


# Settings that decide an expansion's rows: their values are part of its key. The
# ones that pick prompts (PROMPTS) enter it through the prompts they pick, so a
# changed split is a changed expansion and gold fields on a source change nothing.
EXPANSION_SETTINGS = settings_affecting("expansion")
# Settings the trainer reads: the rest stay out of each stage's `prefalign.spa`,
# so a change in the loop's own (prompts, sampling) does not stale finished trainings.
TRAINER_SETTINGS = settings_affecting("training")


def expansion_settings(spa: SpaConfig) -> dict[str, Any]:
    """The values of the settings that key an expansion (with its prompts)."""
    return spa.model_dump(include=set(EXPANSION_SETTINGS))


def stage_prefalign(
    block: dict[str, Any] | None, iteration: int, flags_file: Path | None = None
) -> dict[str, Any]:
    """The `prefalign:` block of one stage's training config: the spa settings the
    trainer reads only, the iteration, and the loss: plain DPO for the seed
    (iteration 0), SPA's after. `flags_file` (gold configured): where the SPA loss
    records each pair's noise flags."""
    pf = copy.deepcopy(block or {})
    spa_block = {
        k: v for k, v in (pf.get("spa") or {}).items() if k in TRAINER_SETTINGS
    }
    pf["spa"] = {**spa_block, "iteration": iteration}
    if flags_file is not None and iteration > 0:
        pf["spa"]["flags_file"] = str(flags_file)
    if iteration == 0:
        pf["loss"] = "sigmoid"
        pf.pop("label_smoothing", None)
    else:
        pf["loss"] = pf.get("loss") or "spa"
    return pf
