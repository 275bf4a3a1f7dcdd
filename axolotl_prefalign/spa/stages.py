"""Resumable stages: each runs as a subprocess, keyed by the settings it ran with
in `spa_state.json`, and is skipped on a rerun while its key and output stand."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.shards import atomic_write_json
from .errors import SpaLoopError

LOG = logging.getLogger("axolotl_prefalign")

# (command, log file) -> None; raises on failure. Tests inject their own.
Runner = Callable[[list[str], Path], None]

# What torchrun / accelerate give each process of a launch: a stage started from a
# loop that itself runs under one would join that launch's group (and wait for
# ranks that never come) instead of starting its own processes.
LAUNCH_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def stage_env() -> dict[str, str]:
    """The environment of a stage subprocess: the caller's (HF_HUB_OFFLINE
    included), no telemetry, and none of the launch variables of a multi-process
    launch the loop may itself run under."""
    env = {"AXOLOTL_DO_NOT_TRACK": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    if "RANK" in env or "LOCAL_RANK" in env:
        for key in [*LAUNCH_ENV, *(k for k in env if k.startswith("TORCHELASTIC_"))]:
            env.pop(key, None)
    return env


def run_command(cmd: list[str], log_path: Path) -> None:
    """Run one stage as a subprocess, teeing its output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    LOG.info("SPA: running %s (log: %s)", " ".join(cmd), log_path)
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
    if proc.returncode:
        raise SpaLoopError(
            f"stage failed (exit {proc.returncode}): {' '.join(cmd)}; see {log_path}"
        )


class SpaState:
    """`spa_state.json`: which stages finished, with the settings they ran with."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf-8"))

    def entry(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def finish(self, name: str, sha: str) -> None:
        self.data["stages"][name] = {
            "sha": sha,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(self.path, self.data)

    def forget(self, name: str) -> None:
        if self.data["stages"].pop(name, None) is not None:
            atomic_write_json(self.path, self.data)


def short_sha(text: str) -> str:
    """The first 16 hex digits of the text's SHA-256 (a stage's key)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_key(settings: dict[str, Any], prompts) -> str:
    """The key of one expansion: its generation and judging settings and its own
    prompts (source row and text), as the split of this run picks them."""
    pairs = zip(prompts["index"], prompts["prompt"], strict=True)
    picked = [[int(i), p] for i, p in pairs]
    body = {"settings": settings, "prompts": picked}
    return short_sha(json.dumps(body, sort_keys=True))


@dataclass
class StageRunner:
    """Runs the loop's stages in order: a finished one is skipped while its key and
    output stand; once one runs, every later one runs anew."""

    state: SpaState
    runner: Runner
    # True once a stage ran in this invocation: later stages' old outputs are stale.
    dirty: bool = False
    ran: list[str] = field(default_factory=list)

    def stage(
        self,
        name: str,
        sha: str,
        cmd: list[str],
        log: Path,
        done: Callable[[], bool],
        stale: list[Path],
    ) -> None:
        entry = self.state.entry(name)
        if entry and not log.exists():
            entry = None  # its folder was deleted (as a refusal advises): run anew
        if entry and not self.dirty:
            if entry["sha"] != sha:
                raise SpaLoopError(
                    f"stage {name} finished with other settings than the YAML has "
                    f"now; restore them, or delete {log.parent} and later iterations "
                    "to redo them"
                )
            if done():
                LOG.info("SPA: %s already done, skipped", name)
                return
            LOG.warning(
                "SPA: %s is recorded as done but its output is gone; rerun", name
            )
        if self.dirty:
            # An earlier stage was redone: anything this one left before is stale.
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.state.forget(name)
        self.dirty = True
        self.runner(cmd, log)
        if not done():
            raise SpaLoopError(f"stage {name} ended without its output; see {log}")
        self.state.finish(name, sha)
        self.ran.append(name)
