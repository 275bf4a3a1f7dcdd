"""Where the SPA loop keeps each stage's output under the YAML's `output_dir`."""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "spa_state.json"
SUMMARY_FILE = "spa_summary.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def iter_dir(output_dir: str | Path, iteration: int) -> Path:
    """`output_dir/iter_<i>`."""
    return Path(output_dir) / f"iter_{iteration}"


def has_weights(path: Path) -> bool:
    """True when `path` holds a saved model or adapter."""
    return any((path / name).exists() for name in WEIGHT_FILES)


def expansion_done(d: Path) -> bool:
    """True when `d` holds a complete expansion."""
    manifest = d / "pairs" / "manifest.json"
    if not (manifest.exists() and (d / "summary.json").exists()):
        return False
    return bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))


def pair_files(d: Path) -> list[str]:
    """The pair shard files an expansion's manifest lists (absolute paths)."""
    manifest = json.loads((d / "pairs" / "manifest.json").read_text(encoding="utf-8"))
    # Shards of blocks where every prompt was dropped are empty: nothing to load.
    return [
        str((d / "pairs" / s["file"]).resolve())
        for s in manifest["shards"]
        if s["rows"]
    ]
