"""Dataset converters registered with LLaMA-Factory (`formatting:` in dataset_info).

`formatting: prefalign_pairs` (with `ranking: true`) reads prefalign's own pair rows
— `{prompt, chosen, rejected}` plus SPA's `judge_prob`, `margin`, `iteration`: the
labelled seed files and the pair shards an SPA expansion writes — without a
`columns` mapping. The prompt is one user turn; chosen and rejected are the two
assistant answers LLaMA-Factory's pairwise processor expects. Local files are
checked line by line by the launcher before LLaMA-Factory reads them; a bad row that
reaches the converter (a hub dataset) raises, quoting the row's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory.data.converter import DATASET_CONVERTERS, DatasetConverter

from ...core.rows import RowChecker
from ...spa.pairs import normalize_pair
from .launcher import PAIRS_FORMATTING


@dataclass
class PrefAlignPairsConverter(DatasetConverter):
    """prefalign pair rows → LLaMA-Factory's standard pairwise row."""

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        prompt = example.get("prompt")
        quoted = repr(prompt[:40]) if isinstance(prompt, str) else repr(prompt)
        checker = RowChecker(f"{self.dataset_attr.dataset_name} (prompt {quoted})")
        pair = normalize_pair(example, -1, checker)
        assert pair is not None  # the error policy raises on a bad row
        return {
            "_prompt": [{"role": "user", "content": pair["prompt"]}],
            "_response": [
                {"role": "assistant", "content": pair["chosen"]},
                {"role": "assistant", "content": pair["rejected"]},
            ],
            "_system": "",
            "_tools": "",
            "_images": None,
            "_videos": None,
            "_audios": None,
        }


CONVERTERS = {PAIRS_FORMATTING: PrefAlignPairsConverter}


def register_converters() -> None:
    """Register ours through LLaMA-Factory's `register_dataset_converter` (once)."""
    from llamafactory.data.converter import register_dataset_converter

    for name, cls in CONVERTERS.items():
        if DATASET_CONVERTERS.get(name) is not cls:
            register_dataset_converter(name, cls)
