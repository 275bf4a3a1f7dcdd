"""The `axolotl prefalign` / `prefalign` command group."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from axolotl_prefalign.cli import prefalign

COMMANDS = (
    "prepare-model",
    "contrast-preview",
    "spa-expand",
    "spa",
    "spa-premise",
    "denoise",
    "robustft-premise",
)


def test_group_lists_every_command():
    result = CliRunner().invoke(prefalign, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("argv", [["axolotl", "prefalign"], ["prefalign"]])
def test_entry_points_are_installed(argv):
    exe = Path(sys.executable).parent / argv[0]
    if not exe.exists():
        exe = shutil.which(argv[0])
    assert exe, f"{argv[0]} is not on PATH: reinstall with pip install -e ."
    proc = subprocess.run(
        [str(exe), *argv[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spa-expand" in proc.stdout


def test_prepare_model_prints_the_prepared_folder(smollm2_dir):
    result = CliRunner().invoke(prefalign, ["prepare-model"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(smollm2_dir)


def test_typo_in_prefalign_block_is_one_clear_line(tmp_path, tiny_model_dir):
    cfg = {
        "base_model": str(tiny_model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {"spa": {"alhpa": 0.3}},
        "rl": "dpo",
        "datasets": [
            {"path": "x.jsonl", "ds_type": "json", "type": "chatml.prompt_pairs"}
        ],
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(prefalign, ["spa", str(path)])
    assert result.exit_code == 1
    assert "Error: PrefAlignConfigError: invalid prefalign: block: unknown key" in (
        result.output
    )
    assert "'prefalign.spa.alhpa' (did you mean 'alpha'?)" in result.output
    assert "Traceback" not in result.output


def test_pipeline_errors_are_one_clear_line(tmp_path, tiny_model_dir):
    cfg = {
        "base_model": str(tiny_model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "datasets": [{"path": "x.jsonl", "ds_type": "json", "type": "alpaca"}],
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "no_robustft.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(prefalign, ["denoise", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: RobustFTError: ")
    assert "axolotl_prefalign.robustft" in result.output
    assert "Traceback" not in result.output
