"""`prefalign contrast-preview`: rows as training sees them, loss spans marked."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..core.rows import BadRowError
from .format import ContrastFormat, EncodedRow

_MARKS = {
    "loss": ("⟦", "⟧", "\x1b[1;32m", "\x1b[0m"),
    "negative": ("⟨", "⟩", "\x1b[31m", "\x1b[0m"),
}


def render_marked(fmt: ContrastFormat, encoded: EncodedRow, color: bool = False) -> str:
    """Decoded row with the loss span in ⟦ ⟧ (and unlikelihood span in ⟨ ⟩)."""
    show_negative = fmt.config.unlikelihood_weight > 0

    def mark(kind: str) -> str | None:
        if kind in ("positive", "end"):
            return "loss"
        return "negative" if kind == "negative" and show_negative else None

    out, start = [], 0
    for j in range(1, len(encoded.ids) + 1):
        if j < len(encoded.ids) and mark(encoded.kinds[j]) == mark(
            encoded.kinds[start]
        ):
            continue
        text = fmt.tokenizer.decode(
            encoded.ids[start:j],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        m = mark(encoded.kinds[start])
        if m:
            left, right, on, off = _MARKS[m]
            text = f"{on}{text}{off}" if color else f"{left}{text}{right}"
        out.append(text)
        start = j
    return "".join(out)


def print_preview(
    fmt: ContrastFormat,
    rows: Sequence[Any],
    num_rows: int = 3,
    echo: Callable[[str], Any] = print,
) -> None:
    """Print the first `num_rows` rows rendered by `fmt`, loss spans marked."""
    c = fmt.config
    color = sys.stdout.isatty()
    echo(
        f"{fmt.source}: {len(rows)} rows · preset {c.preset} · mode {c.mode} · "
        f"order {c.order} · positive_only_ratio {c.positive_only_ratio} · "
        f"unlikelihood_weight {c.unlikelihood_weight} · sequence_len "
        f"{fmt.sequence_len}"
    )
    legend = "loss-carrying span in ⟦ ⟧"
    if c.unlikelihood_weight > 0:
        legend += ", unlikelihood span in ⟨ ⟩"
    echo(legend + ("  (coloured on a terminal)" if color else ""))
    for index in range(min(num_rows, len(rows))):
        try:
            encoded = fmt.encode_row(rows[index], index)
        except BadRowError as err:
            echo(f"\n── row {index + 1}: BAD ROW: {err}")
            continue
        n_loss = sum(k in ("positive", "end") for k in encoded.kinds)
        n_neg = sum(k == "negative" for k in encoded.kinds)
        notes = ["positive-only"] if encoded.positive_only else []
        notes += [t.replace("_", " ") for t in encoded.truncation]
        echo(
            f"\n── row {index + 1} ── {len(encoded.ids)} tokens, {n_loss} with loss, "
            f"{n_neg} in the negative answer"
            + (f" ({', '.join(notes)})" if notes else "")
        )
        echo(render_marked(fmt, encoded, color=color))
