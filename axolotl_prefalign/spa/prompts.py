"""The fresh prompts of each SPA iteration: read from the prompt sources, split into
disjoint parts, with each prompt's gold answer where a source names one."""

from __future__ import annotations

import logging

from ..core.config import SpaConfig, SpaPromptSource
from ..core.rows import RowChecker, text_problem
from .errors import SpaLoopError

LOG = logging.getLogger("axolotl_prefalign")


def load_prompts(
    source: SpaPromptSource, on_bad_row: str = "error", gold_checker: str = "choice"
):
    """A source's prompts as a Dataset with `index` (source row) and `prompt`;
    with `gold_field` also `gold` (resolved for the checker, None where a row's
    gold is unusable under on_bad_row: skip) and `options` (list, maybe empty)."""
    from datasets import Dataset

    from ..core.local_data import DataFileError, read_local

    checker = RowChecker(str(source.path), on_bad_row)
    try:
        data = read_local(
            source.path, split=source.split, checker=checker, name=source.name
        )
    except DataFileError as err:
        raise SpaLoopError(f"prefalign.spa.prompts: {err}") from None
    checker.lines = data.lines
    _check_gold_columns(source, data.rows)
    columns: dict[str, list] = {"index": [], "prompt": []}
    if source.gold_field:
        columns.update(gold=[], options=[])
    # A bad gold never drops a prompt (it would change training): an error, or
    # under skip a pair the report counts as unknown (no_gold).
    gold_rows = RowChecker(str(source.path), on_bad_row, lines=data.lines)
    for idx, row in enumerate(data.rows):
        problem = text_problem(row, source.field)
        if problem:
            checker.bad(idx, source.field, problem)
            continue
        columns["index"].append(data.positions[idx])
        columns["prompt"].append(row[source.field].strip())
        if source.gold_field:
            gold, options = _row_gold(source, row, idx, gold_checker, gold_rows)
            columns["gold"].append(gold)
            columns["options"].append(options)
    checker.report()
    if gold_rows.n_skipped:
        detail = "; ".join(f"{n} × {why}" for why, n in gold_rows.skipped.most_common())
        LOG.warning(
            "%s: %d prompt(s) without a usable gold answer (kept for training, "
            "unknown in the gold report): %s",
            source.path,
            gold_rows.n_skipped,
            detail,
        )
    return Dataset.from_dict(columns)


def _check_gold_columns(source: SpaPromptSource, rows: list[dict]) -> None:
    for key in ("gold_field", "gold_options_field"):
        name = getattr(source, key)
        if name and rows and not any(name in row for row in rows):
            present = sorted({k for row in rows for k in row})
            raise SpaLoopError(
                f"prefalign.spa.prompts: {source.path} has no column {name!r} "
                f"({key}); its columns: {', '.join(present)}"
            )


def _row_gold(
    source: SpaPromptSource, row: dict, idx: int, gold_checker: str, checker: RowChecker
) -> tuple[str | None, list[str]]:
    from .gold import GoldError, check_options, resolve_gold

    options: list[str] = []
    try:
        if source.gold_options_field:
            field_name = source.gold_options_field
            options = check_options(row.get(field_name))
        field_name = source.gold_field
        return resolve_gold(row.get(field_name), options, gold_checker), options
    except GoldError as err:
        checker.bad(idx, field_name, str(err))
        return None, options


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def iteration_prompts(spa: SpaConfig, on_bad_row: str = "error") -> list:
    """The fresh prompts of iterations 1..N (element i−1 = iteration i), checked to
    be non-empty and disjoint across iterations."""
    n = spa.iterations
    sources, sizes = spa.prompts, spa.prompts_per_iteration
    if not sources:
        raise SpaLoopError(
            "prefalign.spa.prompts is empty: SPA iterations need fresh prompts "
            "(one source per iteration, or one source split by prompts_per_iteration)"
        )
    if sizes is not None and len(sizes) != n:
        raise SpaLoopError(
            f"prefalign.spa.prompts_per_iteration has {len(sizes)} sizes for "
            f"{n} iterations"
        )
    if sizes is not None and min(sizes) < 1:
        raise SpaLoopError("prefalign.spa.prompts_per_iteration: sizes must be >= 1")
    check = spa.gold_checker
    if len(sources) == n:
        parts = [load_prompts(s, on_bad_row, check) for s in sources]
        if sizes is not None:
            for i, (part, size) in enumerate(zip(parts, sizes, strict=True), 1):
                if len(part) < size:
                    raise SpaLoopError(
                        f"iteration {i}: {sources[i - 1].path} has {len(part)} usable "
                        f"prompts, prompts_per_iteration asks for {size}"
                    )
            parts = [p.select(range(s)) for p, s in zip(parts, sizes, strict=True)]
    elif len(sources) == 1:
        whole = load_prompts(sources[0], on_bad_row, check)
        if sizes is None:
            base, extra = divmod(len(whole), n)
            sizes = [base + (k < extra) for k in range(n)]
        if sum(sizes) > len(whole):
            raise SpaLoopError(
                f"too few prompts: {sources[0].path} has {len(whole)} usable prompts, "
                f"the {n} iterations need {sum(sizes)} ({sizes})"
            )
        starts = [sum(sizes[:k]) for k in range(n)]
        parts = [
            whole.select(range(a, a + s)) for a, s in zip(starts, sizes, strict=True)
        ]
    else:
        raise SpaLoopError(
            f"prefalign.spa.prompts has {len(sources)} sources for {n} iterations: "
            "give one per iteration, or one to split into disjoint parts"
        )
    seen: dict[str, int] = {}
    for i, part in enumerate(parts, 1):
        if len(part) == 0:
            raise SpaLoopError(f"iteration {i} has no prompts")
        for prompt in part["prompt"]:
            first = seen.setdefault(_norm(prompt), i)
            if first != i:
                raise SpaLoopError(
                    f"prompt {prompt[:60]!r} is in iterations {first} and {i}: SPA "
                    "needs fresh prompts each iteration (the parts overlap)"
                )
        repeated = len(part) - len({_norm(p) for p in part["prompt"]})
        if repeated:
            LOG.warning("SPA iteration %d: %d repeated prompt(s)", i, repeated)
    return parts
