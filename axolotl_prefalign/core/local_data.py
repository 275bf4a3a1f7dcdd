"""Reading local data files, with errors that name the file, line and field.

One reader for every input path of the plugin (SPA prompts, RobustFT input, the
export, contrast preview, the pre-check of `datasets:` entries): a `.jsonl`/`.json`
file (optionally `.gz`), a `.parquet`/`.csv`/`.arrow` file, a folder of such files,
or a `datasets.save_to_disk` folder; named by a path or by a `datasets:` entry
(`path`, `data_files`, `split`, `ds_type`) as Axolotl spells it.

JSON is parsed here, line by line, rather than by `datasets`: its JSON builder
reports a malformed line or a column of mixed types as a traceback that names
neither the line nor the field, and it casts a whole column by its first rows, so a
bad value is blamed on the wrong row. Lines are 1-based, as editors show them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataset_info import convert_row, dataset_entry, is_dataset_info
from .rows import RowChecker
from .text_files import DataFileError, read_text, sniff, text_lines

LOG = logging.getLogger("axolotl_prefalign")

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


__all__ = ["DataFileError", "LocalRows", "read_entry", "read_local"]


@dataclass
class LocalRows:
    """Rows read from local files, each with the file and 1-based line it came from.

    `lines[i]` is None for rows that have no line (parquet, a JSON list, a saved
    dataset). `positions[i]` is the row's 0-based place among all records of the
    source, unreadable ones included, so it does not shift when lines are skipped.
    """

    source: str
    rows: list[Any] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    lines: list[int | None] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    n_seen: int = 0  # records read, unreadable ones included
    n_skipped: int = 0  # unreadable rows dropped under on_bad_row: skip
    # True when the rows are not the files' own records (a LLaMA-Factory dataset
    # read in prefalign's column names): Axolotl must read a converted copy.
    converted: bool = False
    # Why `datasets` would misread a file (UTF-16, a byte-order mark, gzip under
    # a plain name): Axolotl and LLaMA-Factory then read a UTF-8 copy.
    recoded: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def checker(self, policy: str) -> RowChecker:
        """A RowChecker whose errors name each row's line."""
        return RowChecker(self.source, policy, lines=self.lines)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*JSON_SUFFIXES, *TABLE_FORMATS):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def entry_get(entry: Any, key: str) -> Any:
    """A key of a `datasets:` entry, given as a mapping or an attribute object."""
    if isinstance(entry, Mapping):
        return entry.get(key)
    return getattr(entry, key, None)


def _finite(value: Any) -> bool:
    """False for NaN/inf anywhere inside a parsed JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _read_json_lines(path: Path, out: LocalRows, checker: RowChecker) -> None:
    """Append the objects of a JSON-lines file; blank lines are allowed."""
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            out.n_seen += 1
            checker.bad(len(out.rows), None, f"malformed JSON ({err.msg})", n)
            continue
        _append(out, checker, row, str(path), n)


def _append(
    out: LocalRows, checker: RowChecker, row: Any, file: str, line: int | None
) -> None:
    position = out.n_seen
    out.n_seen += 1
    if not isinstance(row, dict):
        kind = "a list" if isinstance(row, list) else type(row).__name__
        checker.bad(len(out.rows), None, f"must be a JSON object, got {kind}", line)
        return
    if not _finite(row):
        checker.bad(len(out.rows), None, "holds NaN or Infinity", line)
        return
    out.rows.append(row)
    out.files.append(file)
    out.lines.append(line)
    out.positions.append(position)


def _read_json(path: Path, out: LocalRows, checker: RowChecker) -> None:
    """A `.json` file: a list of objects, or JSON lines under a .json name."""
    text = read_text(path)
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # datasets accepts JSON lines named .json; so do we, with line numbers.
        _read_json_lines(path, out, checker)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(
            f"{path}, line {err.lineno}: malformed JSON ({err.msg})"
        ) from None
    for row in data:
        _append(out, checker, row, str(path), None)


def _read_table(path: Path, kind: str, split: str) -> list[dict[str, Any]]:
    import datasets

    if kind == "csv":
        for _ in text_lines(path):  # bad bytes: an error naming the line
            pass
        if sniff(path).recoded:
            path = _utf8_copy(path)
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split=split)
    except Exception as err:  # pyarrow/pandas errors name neither file nor fix
        while err.__cause__ is not None:
            err = err.__cause__
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataFileError(
            f"{path}: not a readable {kind} file ({first[:200]}); was it cut off "
            "while copying? Write it again"
        ) from None
    return ds.to_list()


def _utf8_copy(path: Path) -> Path:
    """A UTF-8 copy of a text file in another encoding, in the cache, for readers
    that take UTF-8 only (pandas' CSV reader)."""
    import hashlib

    from .models import cache_dir
    from .shards import atomic_write_text

    text = read_text(path) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    copy = cache_dir() / "recoded" / f"{digest}-{path.name.removesuffix('.gz')}"
    if not copy.exists():
        atomic_write_text(copy, text)
    return copy


def _read_saved(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataFileError(
                f"{path}: saved dataset has splits {sorted(ds)}, not {split!r}"
            )
        ds = ds[split]
    return ds.to_list()


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (
        path / "dataset_dict.json"
    ).exists()


def data_files(path: str | Path, files: Any = None) -> list[Path]:
    """The files a path (file or folder) or an explicit `data_files` names."""
    base = Path(str(path)).expanduser()
    if files:
        names = [files] if isinstance(files, str) else list(files)
        out = []
        for name in names:
            f = Path(str(name)).expanduser()
            if not f.is_absolute() and base.is_dir():
                f = base / f
            out.append(f)
        return out
    if base.is_dir():
        return sorted(
            f
            for f in base.iterdir()
            if f.is_file() and _suffix(f) in (*JSON_SUFFIXES, *TABLE_FORMATS)
        )
    return [base]


def read_local(
    path: str | Path,
    *,
    files: Any = None,
    split: str | None = None,
    ds_type: str | None = None,
    on_bad_row: str = "error",
    source: str | None = None,
    checker: RowChecker | None = None,
    name: str | None = None,
) -> LocalRows:
    """Every row of a local file or folder; unreadable lines raise or are counted.

    A LLaMA-Factory `dataset_info.json` as `path` reads its dataset `name` in
    prefalign's column names (`core.dataset_info`).

    Under `on_bad_row: skip` malformed lines, non-object lines and NaN values are
    dropped and counted (and reported); a missing or empty source always raises.
    A caller that validates the rows further passes its own `checker`, so that one
    report counts every skipped row; it then reports itself.
    """
    base = Path(str(path)).expanduser()
    if is_dataset_info(base) and base.is_file():
        return _read_dataset_info(base, name, on_bad_row, checker)
    split = split or "train"
    out = LocalRows(source or str(path))
    shared = checker is not None
    if checker is None:
        checker = RowChecker(out.source, on_bad_row)
    if not base.exists():
        raise DataFileError(f"{path} does not exist")
    if base.is_dir() and not files and _is_saved_dataset(base):
        for row in _read_saved(base, split):
            _append(out, checker, row, str(base), None)
        return _finish(out, checker, shared)
    paths = data_files(base, files)
    if not paths:
        raise DataFileError(
            f"{path}: the folder holds no .jsonl/.json/.parquet/.csv/.arrow file"
        )
    for f in paths:
        if f.is_dir():
            raise DataFileError(
                f"{f} is a folder, not a file: name the files in it, or give the "
                "folder as `path` alone"
            )
        recoded = sniff(f).recoded  # missing, empty, compressed: one clear line
        suffix = _suffix(f)
        kind = "json" if suffix in JSON_SUFFIXES else TABLE_FORMATS.get(suffix)
        if ds_type and ds_type != kind and ds_type in ("json", *TABLE_FORMATS.values()):
            kind = ds_type
        before = len(out.rows) + checker.n_skipped
        if kind in ("json", "csv") and recoded:
            LOG.info("%s: %s, read as UTF-8 text", f, recoded)
            out.recoded = out.recoded or recoded
        if kind == "json":
            if suffix.startswith(".jsonl"):
                _read_json_lines(f, out, checker)
            else:
                _read_json(f, out, checker)
        elif kind is not None:
            for row in _read_table(f, kind, split):
                _append(out, checker, row, str(f), None)
        else:
            raise DataFileError(
                f"{f}: use a .jsonl, .json, .parquet, .csv or .arrow file "
                "(or a datasets.save_to_disk folder)"
            )
        if len(out.rows) + checker.n_skipped == before:
            raise DataFileError(f"{f}: the file is empty (no rows)")
    return _finish(out, checker, shared)


def _finish(out: LocalRows, checker: RowChecker, shared: bool) -> LocalRows:
    if not shared:
        checker.report()
    out.n_skipped = checker.n_skipped
    if not out.rows:
        raise DataFileError(
            f"{out.source}: no usable rows"
            + (f" ({checker.n_skipped} skipped)" if checker.n_skipped else "")
        )
    return out


def _read_dataset_info(
    info_path: Path, name: str | None, on_bad_row: str, checker: RowChecker | None
) -> LocalRows:
    entry = dataset_entry(info_path, name)
    file = info_path.parent / entry["file_name"]
    shared = checker is not None
    if checker is None:
        checker = RowChecker(str(file), on_bad_row)
    checker.source = str(file)  # errors name the data file, not dataset_info.json
    data = read_local(file, on_bad_row=on_bad_row, source=str(file), checker=checker)
    checker.lines = data.lines
    out = LocalRows(
        str(file),
        files=data.files,
        n_seen=data.n_seen,
        converted=True,
        recoded=data.recoded,
    )
    for i, row in enumerate(data.rows):
        converted = convert_row(row, entry, i, checker)
        if converted is not None:
            out.rows.append(converted)
            out.lines.append(data.lines[i])
            out.positions.append(data.positions[i])
    checker.lines = out.lines
    return _finish(out, checker, shared)


def read_entry(entry: Any, on_bad_row: str = "error") -> LocalRows:
    """The rows of a `datasets:` entry that names local data (path, data_files,
    split, ds_type as Axolotl spells them)."""
    path = entry_get(entry, "path")
    if not path:
        raise DataFileError("a datasets: entry needs `path`")
    files = entry_get(entry, "data_files")
    source = f"{path} ({files})" if files else str(path)
    return read_local(
        path,
        files=files,
        split=entry_get(entry, "split"),
        ds_type=entry_get(entry, "ds_type"),
        on_bad_row=on_bad_row,
        source=source,
        name=entry_get(entry, "name"),
    )


def is_local(entry: Any) -> bool:
    """True when a `datasets:` entry names an existing local file or folder."""
    path = entry_get(entry, "path")
    return bool(path) and Path(str(path)).expanduser().exists()


def looks_local(entry: Any) -> bool:
    """True when a `datasets:` entry names a file (by suffix or `ds_type`), so a
    missing path is a typo, not a hub dataset."""
    path = str(entry_get(entry, "path") or "")
    kind = entry_get(entry, "ds_type")
    local_kinds = ("json", *TABLE_FORMATS.values())
    return _suffix(Path(path)) in (*JSON_SUFFIXES, *TABLE_FORMATS) or (
        kind in local_kinds
    )


def write_jsonl(rows: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines atomically (temp file + rename)."""
    from .shards import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(Path(path), text)
    return Path(path)


def checked_copy(rows: list[Any], name: str) -> Path:
    """The rows kept by a pre-check, as a jsonl file in the cache named by `name`
    (a file name) and the rows' hash: training then reads exactly these rows."""
    import hashlib

    from .models import cache_dir

    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    stem = name.split(".")[0] or "dataset"
    return write_jsonl(rows, cache_dir() / "checked" / f"{stem}-{digest}.jsonl")


@dataclass
class CheckedRows:
    """What a pre-check kept: the rows, how many were skipped, and the checked copy
    training must read instead of the file (None when the file can be read as is)."""

    rows: list[Any]
    skipped: int
    copy: Path | None


def keep_checked(
    data: LocalRows,
    keep: Callable[[list[Any], RowChecker], Iterable[int]],
    on_bad_row: str,
    *,
    copy_always: bool = False,
) -> CheckedRows:
    """Check `data` row by row with `keep` (the indices of the usable rows).

    Bad rows raise (on_bad_row: error) or are counted, logged and left out of a
    checked copy (skip); no usable row at all is an error. `copy_always` writes the
    copy even when nothing was skipped (rows converted from another format).
    """
    checker = data.checker(on_bad_row)
    kept = [data.rows[i] for i in keep(data.rows, checker)]
    checker.report()
    skipped = data.n_skipped + checker.n_skipped
    if not kept:
        raise DataFileError(f"{data.source}: no usable rows ({skipped} skipped)")
    copy = None
    if skipped or copy_always:
        copy = checked_copy(kept, Path(data.source).name)
        if skipped:
            LOG.warning(
                "%s: %d row(s) kept, %d skipped (on_bad_row: skip); training reads "
                "the checked copy %s",
                data.source,
                len(kept),
                skipped,
                copy,
            )
    return CheckedRows(kept, skipped, copy)
