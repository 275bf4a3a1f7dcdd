"""TRL 1.16.0's own DPOTrainer beside ours (benchmarks/dpo_step.py, arm trl116), tiny.

The arm runs in TRL 1.16's own environment (tests/trl_env.sh builds .venv-trl116).
Without one this skips, except where PREFALIGN_REQUIRE_TRL116=1 (CI builds it): then
it fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, side_env_python


@pytest.fixture
def trl116_python() -> str:
    """The Python of the TRL 1.16 environment, or skip (fail where required)."""
    return side_env_python(
        os.environ.get(
            "PREFALIGN_TRL116_PYTHON", str(REPO / ".venv-trl116" / "bin" / "python")
        ),
        "import trl; assert trl.__version__ == '1.16.0'",
        missing="TRL 1.16 environment",
        broken="has no TRL 1.16.0",
        require="PREFALIGN_REQUIRE_TRL116",
        build="tests/trl_env.sh",
    )


@pytest.mark.slow  # two trainer subprocesses (Axolotl's and TRL's start-up)
def test_trl116_dpo_step_matches_ours_on_the_same_weights_and_tokens(
    trl116_python, tmp_path
):
    """One tiny step each: TRL 1.16's loss and LoRA gradients equal ours."""
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "dpo_step.py"),
            "--quick",
            "--steps",
            "1",
            "--configs",
            "prefalign",
            "trl116",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PREFALIGN_TRL116_PYTHON": trl116_python},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["not_run"] == {}
    ours, trl = report["results"]["prefalign"], report["results"]["trl116"]
    assert (ours["trl"], trl["trl"]) == (report["versions"]["trl"], "1.16.0")
    # The same reference in both (TRL's frozen copy of the initial adapter), and the
    # trained adapter moved off it: the loss is not log 2.
    assert ours["reference"] == trl["reference"] == "ref adapter"
    assert abs(trl["step1_loss"] - math.log(2)) > 1e-3
    agree = report["agreement_vs_prefalign"]["trl116"]
    assert agree["same_token_ids"], (ours["step1_pairs"], trl["step1_pairs"])
    assert trl["step1_pairs"]["tokens"] == [32, 32]  # prompt + response + EOS
    assert agree["loss_within_tol"], agree
    # 1 layer × 7 linears × (A, B), each within rtol 1e-4 of ours
    assert agree["lora_tensors"] == 14 and agree["grads_within_tol"], agree
    assert agree["grad_elements_outside_tol"] == 0
    assert agree["max_abs_grad"] > 1e-3  # gradients that are not all zero
    assert "| trl116 |" in proc.stdout and "time / TRL 1.16" in proc.stdout
