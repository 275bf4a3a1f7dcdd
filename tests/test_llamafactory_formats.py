"""LLaMA-Factory's own preference formats through our LLaMA-Factory trainer.

The sharegpt and alpaca pairwise (`ranking: true`) layouts of LLaMA-Factory's
data/README.md and data/dataset_info.json (`dpo_en_demo`: sharegpt with
chosen/rejected messages; alpaca with chosen/rejected columns), with and without
a system prompt and earlier turns, each train one step of `stage: dpo` with
`pref_loss` sigmoid, hinge or ipo as LLaMA-Factory's examples set it; plus a
config with `learning_rate: 5e-6` and `key=value` overrides, and a finished
epoch-based run started again. All runs share one LLaMA-Factory process
(tests/llamafactory_matrix.py): one model import, not one per format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, llamafactory_python
from test_llamafactory import run_lf

BETA = 0.1  # pref_beta of LLaMA-Factory's DPO examples
SYSTEM = "You are a terse geography tutor."
EARLIER = ("Name a European capital.", "Madrid is one.")
QUESTION = "What is the capital of France?"
CHOSEN, REJECTED = "Paris is the capital.", "Rome is the capital."
PAIRS = [(QUESTION, CHOSEN, REJECTED), ("How many legs has a spider?", "Eight", "Six")]


def _sharegpt(system_turn: bool = False, system_column: bool = False, history=False):
    """Rows and dataset_info entry in `dpo_en_demo`'s layout."""
    rows = []
    for q, chosen, rejected in PAIRS:
        turns = [{"from": "human", "value": q}]
        if history:
            turns = [
                {"from": "human", "value": EARLIER[0]},
                {"from": "gpt", "value": EARLIER[1]},
                *turns,
            ]
        if system_turn:
            turns = [{"from": "system", "value": SYSTEM}, *turns]
        row = {
            "conversations": turns,
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        }
        if system_column:
            row["system"] = SYSTEM
        rows.append(row)
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    if system_column:
        columns["system"] = "system"
    entry = {"formatting": "sharegpt", "ranking": True, "columns": columns}
    return rows, entry


def _alpaca(system: bool = False, history: bool = False):
    """Rows and dataset_info entry of an alpaca preference set."""
    rows = []
    for q, chosen, rejected in PAIRS:
        row = {"instruction": q, "input": "", "chosen": chosen, "rejected": rejected}
        if system:
            row["system"] = SYSTEM
        if history:
            row["history"] = [list(EARLIER)]
        rows.append(row)
    columns = {
        "prompt": "instruction",
        "query": "input",
        "chosen": "chosen",
        "rejected": "rejected",
    }
    if system:
        columns["system"] = "system"
    if history:
        columns["history"] = "history"
    return rows, {"ranking": True, "columns": columns}


# name: (rows and entry, pref_loss, with a system prompt, with earlier turns)
FORMATS = {
    "sharegpt": (_sharegpt(), "sigmoid", False, False),
    "sharegpt_system_turn": (_sharegpt(system_turn=True), "hinge", True, False),
    "sharegpt_system_history": (
        _sharegpt(system_column=True, history=True),
        "ipo",
        True,
        True,
    ),
    "alpaca": (_alpaca(), "ipo", False, False),
    "alpaca_system_history": (_alpaca(system=True, history=True), "hinge", True, True),
}
# Each loss at step 0, where the LoRA policy is still the reference (h = 0):
# sigmoid −log σ(0) = ln 2; hinge relu(1 − β·0) = 1; ipo (0 − 1/(2β))².
LOSS_AT_START = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * BETA)) ** 2}

# `5e-6` as users write it (a string to PyYAML); overrides as llamafactory-cli's.
LITERAL_CONFIG = "learning_rate: 5e-6\npref_loss: hinge\n"
OVERRIDES = ["pref_loss=sigmoid", "max_steps=1", "prefalign.loss=sigmoid"]


def _config(tmp: Path, model: Path, name: str, dataset: str, **extra) -> dict:
    return {
        "model_name_or_path": str(model),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "pref_beta": BETA,
        "dataset": dataset,
        "dataset_dir": str(tmp / "data"),
        "template": "default",
        "cutoff_len": 256,
        "overwrite_cache": True,
        "output_dir": str(tmp / "out" / name),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": 1,
        "max_steps": 1,
        "learning_rate": 5.0e-6,
        "lr_scheduler_type": "constant",
        "disable_shuffling": True,
        "use_cpu": True,
        "seed": 0,
        **extra,
    }


def _spec(tmp: Path, model: Path) -> dict:
    data = tmp / "data"
    data.mkdir()
    info, runs = {}, []

    def write(name: str, config: dict, text: str = "", **run) -> None:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config) + text)
        runs.append({"name": name, "config": str(path), **run})

    for name, ((rows, entry), loss, _, _) in FORMATS.items():
        (data / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json", **entry}
        write(name, _config(tmp, model, name, name, pref_loss=loss))
    (data / "dataset_info.json").write_text(json.dumps(info))
    literal = _config(tmp, model, "literal", "alpaca", max_steps=5)
    for key in ("learning_rate", "pref_loss"):
        literal.pop(key, None)
    write("literal", literal, LITERAL_CONFIG, overrides=OVERRIDES)
    rerun = _config(tmp, model, "rerun", "sharegpt", num_train_epochs=1.0)
    for key in ("max_steps", "overwrite_output_dir"):
        rerun.pop(key)
    write("rerun", {**rerun, "save_strategy": "epoch"}, times=2)
    return {
        "model": str(model),
        "runs": runs,
        "read_args": [{"config": str(tmp / "literal.yaml"), "overrides": OVERRIDES}],
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model_dir) -> dict:
    python = llamafactory_python()
    tmp = tmp_path_factory.mktemp("lf-matrix")
    (tmp / "spec.json").write_text(json.dumps(_spec(tmp, tiny_model_dir)))
    script = REPO / "tests" / "llamafactory_matrix.py"
    proc = run_lf(python, script, "spec.json", "out.json", cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {**json.loads((tmp / "out.json").read_text()), "tmp": tmp}


@pytest.mark.slow
@pytest.mark.llamafactory_env
@pytest.mark.parametrize("name", list(FORMATS))
def test_llamafactory_preference_format_trains_with_our_trainer(matrix, name):
    (_, loss, system, history) = FORMATS[name]
    (run,) = matrix["runs"][name]
    assert run["error"] is None, run["error"]
    assert run["built"] == 1 and run["batches_seen"] == 1
    (batch,) = run["batches"]
    assert batch["loss"] == pytest.approx(LOSS_AT_START[loss], rel=1e-5)
    assert batch["metrics"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # What LLaMA-Factory's template rendered from the format: the prompt (with
    # the system prompt and earlier turns where the row had them) and the answers,
    # only the answer tokens labelled.
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        assert QUESTION in batch[side] and answer in batch[side]
        assert (SYSTEM in batch[side]) is system
        assert all(t in batch[side] for t in EARLIER) is history
        assert batch[f"{side}_response"].strip() == answer


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_exponent_learning_rate_and_overrides_train(matrix):
    """`learning_rate: 5e-6` trains (it crashed the optimizer as a string) and
    `key=value` overrides apply: one step, sigmoid instead of the YAML's hinge."""
    (run,) = matrix["runs"]["literal"]
    assert run["error"] is None, run["error"]
    (batch,) = run["batches"]
    assert batch["loss"] == pytest.approx(math.log(2), rel=1e-5)
    state = json.loads(
        (matrix["tmp"] / "out" / "literal" / "trainer_state.json").read_text()
    )
    (logged,) = [h for h in state["log_history"] if "loss" in h]
    assert logged["learning_rate"] == pytest.approx(5e-6)
    assert state["max_steps"] == 1


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_our_reader_gives_what_llamafactorys_read_args_gives(matrix):
    (read,) = matrix["read_args"]
    assert read["ours"] == read["theirs"]
    assert read["ours"]["learning_rate"] == 5e-6
    assert read["ours"]["prefalign"] == {"loss": "sigmoid"}


@pytest.mark.slow
@pytest.mark.llamafactory_env
def test_a_finished_run_started_again_has_nothing_to_train_and_succeeds(matrix):
    first, again = matrix["runs"]["rerun"]
    assert first["error"] is None and first["batches_seen"] == 2
    assert again["error"] is None, again["error"]
    assert again["built"] == 1 and again["batches_seen"] == 0
    checkpoint = str(matrix["tmp"] / "out" / "rerun" / "checkpoint-2")
    assert again["ended_at"] == [2, 2, checkpoint]
    assert (
        f"prefalign: nothing left to train: resumed at step 2 of 2 from {checkpoint}"
        in "\n".join(again["log"])
    )
