"""End to end: `axolotl train` with `type: axolotl_prefalign.contrast` on the CPU."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_axolotl_train, tiny_train_cfg

EXAMPLE = REPO / "axolotl_prefalign" / "data" / "contrast_example.jsonl"


def _contrast_cfg(model_dir, out_dir, contrast: dict) -> dict:
    return tiny_train_cfg(
        model_dir,
        out_dir,
        datasets=[
            {
                "path": str(EXAMPLE),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.contrast",
            }
        ],
        prefalign={"contrast": contrast},
        max_steps=4,
        micro_batch_size=4,
    )


def _saved_weights(out_dir) -> list:
    return sorted(out_dir.glob("*.safetensors"))


@pytest.mark.slow
def test_axolotl_train_with_contrast_format_completes_and_saves(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    cfg = _contrast_cfg(
        tiny_model_dir, out, {"positive_only_ratio": 0.25, "order": "negative_first"}
    )
    proc = run_axolotl_train(cfg, tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert "Rendering contrast rows" in log  # our wrap_dataset ran
    assert _saved_weights(out), f"nothing saved in {out}"
    # Plain SFT: no unlikelihood metric, the stock trainer.
    assert "'unlikelihood'" not in log


@pytest.mark.slow
@pytest.mark.parametrize("mode, packing", [("chat", False), ("raw", True)])
def test_axolotl_train_with_unlikelihood_uses_contrast_trainer(
    tiny_model_dir, tmp_path, mode, packing
):
    out = tmp_path / "out"
    cfg = _contrast_cfg(tiny_model_dir, out, {"mode": mode, "unlikelihood_weight": 0.5})
    cfg.update(adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True)
    if packing:
        # Axolotl's packing collator path: ours must still carry negative_labels.
        cfg.update(sample_packing=True, sequence_len=256, micro_batch_size=1)
    proc = run_axolotl_train(cfg, tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0
    assert "axolotl_prefalign.trainers.ContrastSFTTrainer" in log
    # The negative mask reached compute_loss: the term is logged every step.
    values = [float(v) for v in re.findall(r"'unlikelihood': '?([0-9.]+)", log)]
    assert len(values) >= 4 and all(v > 0 for v in values)
    assert _saved_weights(out), f"nothing saved in {out}"
