"""Many `prefalign llamafactory train` runs in one LLaMA-Factory process.

    python tests/llamafactory_matrix.py SPEC.json OUT.json

SPEC lists runs: {"name", "config" (a config file), "overrides", "times"}. Each
run calls the launcher's `train` `times` times in this process (LLaMA-Factory and
torch are imported once) with a thin recording subclass of our trainer; OUT gets,
per run and call: the error (or null), our trainer's counters, the log lines of
prefalign's logger, and per batch our loss, metrics, the decoded chosen and
rejected sequences and the decoded response tokens (labels != -100). SPEC's
`read_args` entries ({"config", "overrides"}) record our reader's dict beside the
one LLaMA-Factory's own `read_args` makes of the same command line.
Not a test module: tests/test_llamafactory_formats.py runs it with LLaMA-Factory's
Python.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any
from unittest import mock

from llamafactory_recorder import recording_install


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _recorder(tokenizer, batches: list[dict[str, Any]]):
    """Per batch: our loss and metrics, the decoded sequences and responses."""

    def record(trainer, model, batch, train_eval, loss, metrics) -> None:
        ids, labels = batch["input_ids"], batch["labels"]
        half = ids.shape[0] // 2
        batches.append(
            {
                "step": trainer.state.global_step,
                "loss": float(loss),
                "metrics": metrics,
                "chosen": tokenizer.decode(ids[0], skip_special_tokens=True),
                "rejected": tokenizer.decode(ids[half], skip_special_tokens=True),
                "chosen_response": tokenizer.decode(
                    ids[0][labels[0] != -100], skip_special_tokens=True
                ),
                "rejected_response": tokenizer.decode(
                    ids[half][labels[half] != -100], skip_special_tokens=True
                ),
            }
        )

    return record


def run_one(launcher, tokenizer, spec: dict[str, Any]) -> dict[str, Any]:
    """One `train` call, recorded."""
    batches: list[dict[str, Any]] = []
    lines = _Lines()
    ours = logging.getLogger("axolotl_prefalign")
    ours.addHandler(lines)
    installed: list[type] = []
    recording = recording_install(launcher.install, _recorder(tokenizer, batches))

    def install(pa):
        installed.append(recording(pa))
        return installed[-1]

    error = None
    with mock.patch.object(launcher, "install", install):
        try:
            launcher.train(spec["config"], spec.get("overrides", []))
        except Exception as err:  # recorded for the test to judge
            error = f"{type(err).__name__}: {err}"
        finally:
            ours.removeHandler(lines)
    trainer = installed[0] if installed else None
    return {
        "error": error,
        "built": getattr(trainer, "built", None),
        "batches_seen": getattr(trainer, "batches_seen", None),
        "ended_at": getattr(trainer, "ended_at", None),
        "log": lines.lines,
        "batches": batches,
    }


def compare_readers(spec: dict[str, Any]) -> dict[str, Any]:
    """Our reader's dict and LLaMA-Factory's `read_args` of the same command."""
    from llamafactory.hparams.parser import read_args as lf_read_args

    from axolotl_prefalign.integrations.llamafactory.config_file import read_args

    argv = ["llamafactory-cli", spec["config"], *spec["overrides"]]
    with mock.patch.object(sys, "argv", argv):
        theirs = lf_read_args()
    return {"ours": read_args(spec["config"], spec["overrides"]), "theirs": theirs}


def main(spec_path: str, out_path: str) -> None:
    from transformers import AutoTokenizer

    from axolotl_prefalign.integrations.llamafactory import launcher

    spec = json.loads(open(spec_path, encoding="utf-8").read())
    launcher.log_to_stderr()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    out: dict[str, Any] = {"runs": {}, "read_args": []}
    for entry in spec.get("read_args", []):
        out["read_args"].append(compare_readers(entry))
    for run in spec["runs"]:
        out["runs"][run["name"]] = [
            run_one(launcher, tokenizer, run) for _ in range(run.get("times", 1))
        ]
        print(f"matrix: {run['name']} done", flush=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tests/llamafactory_matrix.py SPEC OUT")
    main(sys.argv[1], sys.argv[2])
