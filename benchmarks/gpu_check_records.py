"""How gpu_check.py's workers hand results to the driver: one `RECORD` line of JSON
per result on stdout, read back in order."""

from __future__ import annotations

import contextlib
import json

PREFIX = "RECORD "


def emit(kind: str, payload: dict) -> None:
    """A worker's result line; the driver reads every `RECORD` line, in order."""
    print(PREFIX + json.dumps({"kind": kind, **payload}, default=str), flush=True)


def read_records(stdout: str) -> list[dict]:
    """Every `RECORD` line of a worker's stdout, in order; a line cut short by a
    kill is dropped."""
    records = []
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line[len(PREFIX) :]))
    return records


def without_kind(record: dict) -> dict:
    """A record as the JSON report keeps it: everything but its `kind`."""
    return {key: value for key, value in record.items() if key != "kind"}
