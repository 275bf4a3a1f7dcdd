"""Several processes: SPA's τ and the logged metrics are global, and the pipelines
(SPA expansion and loop, RobustFT denoise, export) write from the main process only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import offline_subprocess_env

from axolotl_prefalign.core import shards
from axolotl_prefalign.core.shards import (
    is_main_process,
    main_process_only,
    process_rank,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "mp_spa_dpo.py"
QUANTILE = 0.3  # prefalign.spa.noise_quantile in the script
WINDOW = 2  # prefalign.spa.margin_window in the script (micro-batches)
PLUGIN = "axolotl_prefalign.PrefAlignPlugin"


@pytest.fixture()
def rank1(monkeypatch):
    """This process as rank 1 of 2 of a torchrun/accelerate launch."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_rank_comes_from_the_launcher_environment(monkeypatch, caplog):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_rank() == (0, 1) and is_main_process()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with caplog.at_level("WARNING", logger="axolotl_prefalign"):
        assert main_process_only("the thing")
    assert "the thing runs on one process; the 3 other rank(s)" in caplog.text
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == (3, 4) and not is_main_process()
    assert not main_process_only("the thing")


def test_initialised_process_group_wins_over_the_environment(monkeypatch):
    class FakeDist:
        def is_available(self):
            return True

        def is_initialized(self):
            return True

        def get_rank(self):
            return 1

        def get_world_size(self):
            return 2

    monkeypatch.setitem(sys.modules, "torch.distributed", FakeDist())
    monkeypatch.setenv("RANK", "0")
    assert process_rank() == (1, 2)
    assert not shards.is_main_process()


def test_denoise_on_another_rank_writes_nothing(rank1, tmp_path):
    from axolotl_prefalign.robustft.pipeline import denoise_from_config

    cfg = {
        "output_dir": str(tmp_path / "out"),
        "base_model": "unused",
        "datasets": [{"path": "x.jsonl", "type": "axolotl_prefalign.robustft"}],
    }

    def never(path):
        raise AssertionError("rank 1 must not load a model")

    assert denoise_from_config(cfg, load_predictor=never, echo=print) == []
    assert not (tmp_path / "out").exists()


def test_spa_expand_and_loop_on_another_rank_do_nothing(rank1, tmp_path):
    from axolotl_prefalign.integrations.axolotl.spa_loop import (
        expand_from_config,
        run_from_config,
    )

    cfg = {"output_dir": str(tmp_path / "out"), "prefalign": {"loss": "spa"}}
    assert expand_from_config(cfg, 1) == {}
    # The loop returns before it even reads its YAML.
    assert run_from_config(cfg, config_path=tmp_path / "missing.yml") == {}
    assert not (tmp_path / "out").exists()


def test_export_on_another_rank_writes_nothing(rank1, tmp_path):
    from axolotl_prefalign.integrations.llamafactory.export import export_from_config

    cfg = {"datasets": [{"path": "x.jsonl", "type": "axolotl_prefalign.spa_pairs"}]}
    assert export_from_config(cfg, tmp_path / "lf") == []
    assert not (tmp_path / "lf").exists()


# ---------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return offline_subprocess_env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


METRICS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "spa/threshold",
    "spa/noisy_fraction",
    "spa/dnd_margin",
    "num_tokens",
)


def _step_logs(result: dict) -> list[dict]:
    return [h for h in result["log_history"] if "loss" in h]


@pytest.mark.slow
def test_spa_threshold_and_metrics_under_two_processes_equal_one_process(
    tmp_path, tiny_model_dir
):
    """`accelerate launch` with 2 CPU processes (gloo), 2 pairs each per step, against
    one process with 4 pairs per step on the same rows in the same order."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _run(
        [
            accelerate,
            "launch",
            "--multi_gpu",  # with CUDA hidden: 2 CPU processes (see the script)
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            str(SCRIPT),
            str(tiny_model_dir),
            str(tmp_path / "two"),
            "2",
        ],
        tmp_path,
    )
    _run(
        [sys.executable, str(SCRIPT), str(tiny_model_dir), str(tmp_path / "one"), "4"],
        tmp_path,
    )
    r0, r1 = (
        json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)
    )
    (one,) = [json.loads((tmp_path / "one" / "rank0.json").read_text())]

    assert (r0["rank"], r1["rank"]) == (0, 1)
    for r in (r0, r1):
        assert (r["world_size"], r["accelerator_processes"], r["backend"]) == (
            2,
            2,
            "gloo",
        )
    # Only the main process runs (and writes) a pipeline.
    assert (
        r0["main_process_only"],
        r1["main_process_only"],
        one["main_process_only"],
    ) == (
        True,
        False,
        True,
    )

    steps = len(one["records"])
    assert steps == 4 and len(r0["records"]) == len(r1["records"]) == steps
    per_rank_would_differ = False
    for k in range(steps):
        union = [
            torch.tensor(r["records"][j]["margins"])
            for j in range(max(0, k - WINDOW + 1), k + 1)
            for r in (r0, r1)
        ]
        tau = torch.quantile(torch.cat(union), QUANTILE).item()
        # τ is the quantile over every rank's margins in the window, on each rank.
        assert r0["records"][k]["tau"] == pytest.approx(tau, abs=1e-6)
        assert r1["records"][k]["tau"] == r0["records"][k]["tau"]
        for r in (r0, r1):
            rec = r["records"][k]
            assert rec["confident"] == [m > rec["tau"] for m in rec["margins"]]
        # ... and what one process computes over the same rows.
        both = r0["records"][k]["margins"] + r1["records"][k]["margins"]
        assert one["records"][k]["margins"] == pytest.approx(both, abs=1e-4)
        assert one["records"][k]["tau"] == pytest.approx(tau, abs=1e-4)
        own = [
            torch.tensor(r0["records"][j]["margins"])
            for j in range(max(0, k - WINDOW + 1), k + 1)
        ]
        local = torch.quantile(torch.cat(own), QUANTILE).item()
        per_rank_would_differ |= abs(local - tau) > 1e-3
    assert per_rank_would_differ  # so the check above can tell gathering apart

    # Logged metrics are reduced over both processes: the same on every rank, and
    # equal to the one-process run's.
    logs0, logs1, logs_one = _step_logs(r0), _step_logs(r1), _step_logs(one)
    assert len(logs0) == len(logs_one) == steps
    for a, b, c in zip(logs0, logs1, logs_one, strict=True):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
            assert a[key] == pytest.approx(c[key], rel=1e-3, abs=1e-5), key
