"""Atomic, resumable sharded output for the pipelines (SPA expansion, RobustFT).

A stage writes rows in shards `shard-00000.jsonl`, ... Each shard is written to a
temporary file and renamed into place, then the manifest (`manifest.json`, also
renamed atomically) records it with the input indices it covers. After a crash the
stage asks `ShardWriter.done_indices()` which inputs are already written and only
processes the rest, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LOG = logging.getLogger("axolotl_prefalign")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed once initialised,
    else the launcher's RANK / WORLD_SIZE (torchrun, accelerate, deepspeed)."""
    # Only ask torch when it is already imported: this module stays light.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on the process that writes pipeline outputs (rank 0, or no launcher)."""
    return process_rank()[0] == 0


def main_process_only(what: str) -> bool:
    """Whether to run a single-process pipeline here: True on the main process; on
    any other rank of a multi-process launch, say so and return False (the main
    process writes every shard and manifest, so ranks never race on one folder)."""
    rank, world = process_rank()
    if rank == 0:
        if world > 1:
            LOG.warning(
                "%s runs on one process; the %d other rank(s) of this launch do "
                "nothing (run it without accelerate/torchrun)",
                what,
                world - 1,
            )
        return True
    LOG.info("%s: rank %d of %d: the main process does this work", what, rank, world)
    return False


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class ShardWriter:
    """Writes one stage's rows as atomic shards recorded in a manifest."""

    def __init__(self, out_dir: str | Path, meta: dict[str, Any] | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MANIFEST
        if path.exists():
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
            if meta is not None and self.manifest.get("meta") != meta:
                raise ValueError(
                    f"{path}: existing output was made with other settings "
                    f"({self.manifest.get('meta')} != {meta}); use a new output "
                    "folder or delete this one"
                )
        else:
            self.manifest = {"meta": meta or {}, "shards": [], "complete": False}
            atomic_write_json(path, self.manifest)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def done_indices(self) -> set[int]:
        """Input indices already covered by written shards."""
        return {i for s in self.manifest["shards"] for i in s["indices"]}

    def write(self, rows: list[dict[str, Any]], indices: Iterable[int]) -> Path:
        """Write one shard of `rows` that covers the given input `indices`."""
        indices = sorted(set(indices))
        overlap = self.done_indices().intersection(indices)
        if overlap:
            raise ValueError(
                f"{self.dir}: inputs {sorted(overlap)[:5]} already written"
            )
        name = f"shard-{len(self.manifest['shards']):05d}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(self.dir / name, text)
        self.manifest["shards"].append(
            {"file": name, "rows": len(rows), "indices": indices}
        )
        atomic_write_json(self.dir / MANIFEST, self.manifest)
        return self.dir / name

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Mark the stage complete (with an optional summary)."""
        self.manifest["complete"] = True
        if summary is not None:
            self.manifest["summary"] = summary
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def rows(self) -> Iterator[dict[str, Any]]:
        """All written rows, in shard order."""
        yield from read_shards(self.dir)


def read_shards(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of the shards a manifest lists (stray temp files are ignored)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    for shard in manifest["shards"]:
        with open(out_dir / shard["file"], encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
