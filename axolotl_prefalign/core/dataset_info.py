"""LLaMA-Factory datasets as inputs: a `dataset_info.json` entry, read without it.

A LLaMA-Factory user's data is a `dataset_info.json` in a `dataset_dir` whose
entries name local files (`file_name`), a `formatting` (alpaca or sharegpt), an
optional `columns` mapping and `ranking: true` for preference pairs (its
data/README.md). `read_dataset_info` turns one entry's rows into prefalign's column
names, with LLaMA-Factory's own rules:

- alpaca: `prompt` = the instruction and the input joined by a newline (as its
  converter does), `response` = the output; ranking sets: `chosen`, `rejected`.
- sharegpt: one user turn (after an optional system message) → `prompt`; the
  assistant turn → `response`; ranking sets: `chosen` / `rejected` messages.
- `system` when the entry maps a system column (or the conversation has one).

With a `columns` mapping, a role it does not name is absent (LLaMA-Factory's
`DatasetAttr.join`); without one the defaults apply. Multi-turn conversations are
bad rows here (the methods take one prompt). Errors name the file, 1-based line and
column, as everywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rows import RowChecker, text_problem
from .text_files import DataFileError, read_text

INFO_FILE = "dataset_info.json"
ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT = {"messages": "conversations"}
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


def is_dataset_info(path: str | Path) -> bool:
    """True when `path` names a LLaMA-Factory dataset_info.json."""
    return Path(str(path)).name == INFO_FILE


def read_info(info_path: Path) -> dict[str, Any]:
    """A dataset_info.json as written by any editor (BOM, UTF-16, CRLF)."""
    try:
        info = json.loads(read_text(info_path))
    except json.JSONDecodeError as err:
        raise DataFileError(
            f"{info_path}, line {err.lineno}: malformed JSON ({err.msg})"
        ) from None
    if not isinstance(info, dict):
        raise DataFileError(
            f"{info_path}: must be a JSON object of datasets by name, "
            f"got {type(info).__name__}"
        )
    return info


def dataset_entry(info_path: Path, name: str | None) -> dict[str, Any]:
    """The entry `name` of a dataset_info.json (local files only)."""
    info = read_info(info_path)
    if not name:
        raise DataFileError(
            f"{info_path} is a LLaMA-Factory dataset_info.json: name one of its "
            f"datasets with `name:` ({', '.join(sorted(info))})"
        )
    if name not in info:
        raise DataFileError(
            f"{info_path} has no dataset {name!r} ({', '.join(sorted(info))})"
        )
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataFileError(
            f"{info_path}, dataset {name!r}: must be a JSON object, "
            f"got {type(entry).__name__}"
        )
    if "file_name" not in entry:
        raise DataFileError(
            f"{info_path}, dataset {name!r}: only local datasets (file_name) are read"
        )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataFileError(
            f"{info_path}, dataset {name!r}: formatting {formatting!r} is not read "
            "(alpaca or sharegpt)"
        )
    return entry


def _columns(entry: dict[str, Any]) -> dict[str, str | None]:
    alpaca = entry.get("formatting", "alpaca") == "alpaca"
    defaults = dict(ALPACA if alpaca else SHAREGPT)
    if "columns" in entry:  # unnamed roles are absent, as in LLaMA-Factory
        return {
            k: entry["columns"].get(k)
            for k in (*defaults, "system", "chosen", "rejected")
        }
    return {**defaults, "system": None, "chosen": "chosen", "rejected": "rejected"}


def convert_row(
    row: dict[str, Any], entry: dict[str, Any], idx: int, checker: RowChecker
) -> dict[str, Any] | None:
    """One LLaMA-Factory row in prefalign's column names; None when bad."""
    cols = _columns(entry)
    ranking = bool(entry.get("ranking"))
    out: dict[str, Any] = {}
    if entry.get("formatting", "alpaca") == "alpaca":
        prompt_col = cols["prompt"]
        problem = text_problem(row, prompt_col) if prompt_col else "missing"
        if problem:
            checker.bad(idx, prompt_col, problem)
            return None
        query = row.get(cols["query"]) if cols["query"] else None
        if query is not None and not isinstance(query, str):
            checker.bad(idx, cols["query"], f"must be text, got {type(query).__name__}")
            return None
        out["prompt"] = "\n".join(t for t in (row[prompt_col], query) if t)
        if ranking:
            for side in ("chosen", "rejected"):
                problem = text_problem(row, cols[side]) if cols[side] else "missing"
                if problem:
                    checker.bad(idx, cols[side], problem)
                    return None
                out[side] = row[cols[side]]
        elif cols["response"] and row.get(cols["response"]) is not None:
            out["response"] = row[cols["response"]]
    else:
        turns = _sharegpt(row, entry, cols, idx, checker)
        if turns is None:
            return None
        out.update(turns)
        if ranking:
            tags = {**TAGS, **(entry.get("tags") or {})}
            for side in ("chosen", "rejected"):
                msg = row.get(cols[side]) if cols[side] else None
                if not isinstance(msg, dict):
                    checker.bad(idx, cols[side], "must be a message (role and content)")
                    return None
                problem = text_problem(msg, tags["content_tag"])
                if problem:
                    checker.bad(idx, cols[side], problem)
                    return None
                out[side] = msg[tags["content_tag"]]
    system = row.get(cols["system"]) if cols["system"] else None
    if isinstance(system, str) and system.strip():
        out.setdefault("system", system)
    return out


def _sharegpt(row, entry, cols, idx, checker) -> dict[str, Any] | None:
    tags = {**TAGS, **(entry.get("tags") or {})}
    col = cols["messages"]
    messages = row.get(col) if col else None
    if not isinstance(messages, list) or not messages:
        checker.bad(idx, col, "must be a non-empty list of messages")
        return None
    out: dict[str, Any] = {}
    role, content = tags["role_tag"], tags["content_tag"]
    if isinstance(messages[0], dict) and messages[0].get(role) == tags["system_tag"]:
        out["system"] = messages[0].get(content)
        messages = messages[1:]
    want = 1 if entry.get("ranking") else 2
    roles = [m.get(role) if isinstance(m, dict) else None for m in messages]
    expected = [tags["user_tag"], tags["assistant_tag"]][:want]
    if roles[: len(expected)] != expected or len(messages) > 2:
        checker.bad(
            idx,
            col,
            "one user turn (and its answer) is read; got roles "
            + ", ".join(map(str, roles)),
        )
        return None
    for key, msg in zip(("prompt", "response"), messages, strict=False):
        problem = text_problem(msg, content)
        if problem:
            checker.bad(idx, col, f"{key} message: {problem}")
            return None
        out[key] = msg[content]
    return out
