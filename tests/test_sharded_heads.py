"""The fused log-prob path with a sharded lm_head: DeepSpeed ZeRO-3 and FSDP2.

Two gloo processes per engine (`tests/mp_sharded_heads.py`, one launch that checks
every layout and case) against one process on the same pairs: per-pair losses,
sequence log-probs, SPA's τ, and the gradient of every trainable parameter (LoRA,
the trained head, or all of them) match in fp32; the uneven step (one rank with a
pair that has no labelled token) ends without a hang.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import mp_sharded_heads as worker
import pytest
import torch
from conftest import offline_subprocess_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "mp_sharded_heads.py"
# A hang (a gather one rank skips) ends here instead of in the CI's timeout.
TIMEOUT_S = 240
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(engine: str, out: Path) -> list[dict]:
    """Both ranks of the worker; their records, or the failure with both logs."""
    env = offline_subprocess_env()
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    port = str(_free_port())
    logs = [out / f"rank{r}.log" for r in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), engine, str(r), port, str(out)],
            stdout=logs[r].open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        for r in (0, 1)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{engine}: no end within {TIMEOUT_S} s (a hang?)\n" + _tails(logs))
    if any(proc.returncode for proc in procs):
        pytest.fail(f"{engine}: a rank failed\n" + _tails(logs))
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


def _largest_difference(ranks: list[dict], reference: dict[int, dict]) -> str:
    """Assert each rank's records equal the one-process run's; the largest gaps."""
    worst = {"values": 0.0, "grads": 0.0}

    def check(actual, expected, what):
        actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=what)
        kind = "grads" if "grad of" in what else "values"
        worst[kind] = max(worst[kind], (actual - expected).abs().max().item())

    for rank, records in enumerate(ranks):
        for step, ref in reference.items():
            got, rows = records[step], worker.rank_slice(step, rank)
            where = f"rank {rank} step {step}"
            check(got["losses"], ref["losses"][rows], f"{where}: per-pair losses")
            check(got["loss"], ref["rank_losses"][rank], f"{where}: loss")
            check(got["chosen"], ref["chosen"][rows], f"{where}: chosen log-probs")
            check(got["rejected"], ref["rejected"][rows], f"{where}: rejected")
            check(got["tau"], ref["tau"], f"{where}: SPA tau")
            assert got["grads"].keys() == ref["grads"].keys(), where
            for name, grad in ref["grads"].items():
                check(got["grads"][name], grad, f"{where}: grad of {name}")
    return ", ".join(f"{k} {v:.1e}" for k, v in worst.items())


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[int, dict]]:
    """One process per case, computed once."""
    cases = set(worker.ZERO3_CASES) | set(worker.FSDP_CASES)
    return {case: worker.one_process(case) for case in cases}


def _grad_names(records: dict[int, dict]) -> list[str]:
    return list(records[1]["grads"])


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None and not os.environ.get("CI"),
    reason="deepspeed not installed (scripts/setup.sh installs it; CI fails instead)",
)
def test_zero3_frozen_and_trained_head_equal_one_process(tmp_path, reference):
    ranks = _launch("zero3", tmp_path)
    for case in worker.ZERO3_CASES:
        worst = _largest_difference([r[case] for r in ranks], reference[case])
        print(f"zero3/{case}: largest difference: {worst}")
    # The cases test what they claim: LoRA grads only, then a head gradient.
    assert not any("lm_head" in n for n in _grad_names(reference["lora"]))
    assert "lm_head.weight" in _grad_names(reference["full"])
    assert "lm_head.weight" not in _grad_names(reference["tied"])  # the embedding


def test_fsdp2_layouts_frozen_and_trained_head_equal_one_process(tmp_path, reference):
    ranks = _launch("fsdp", tmp_path)
    for layout in worker.FSDP_LAYOUTS:
        for case in worker.FSDP_CASES:
            key = f"{layout}/{case}"
            worst = _largest_difference([r[key] for r in ranks], reference[case])
            print(f"fsdp {key}: largest difference: {worst}")
    assert any("modules_to_save" in n for n in _grad_names(reference["head"]))
