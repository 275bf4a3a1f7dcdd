"""A few PrefAlignDPOTrainer steps with `prefalign.loss: spa`, one JSON per rank.

    accelerate launch --multi_gpu --num_processes 2 tests/mp_spa_dpo.py MODEL OUT 2
    python tests/mp_spa_dpo.py MODEL OUT 4                  # the one-process reference

(CUDA hidden: the trainer runs with use_cpu=True, so accelerate sets up gloo; in
accelerate 1.13 `--cpu --num_processes 2` starts ONE process, so `--multi_gpu`
is what spawns the two.) Each rank writes OUT/rank<r>.json: per step its own
micro-batch's β·m_g and the τ the trainer used, the logged metrics, and what the
pipeline guard says on that rank. Not a test module: tests/test_multiprocess.py
launches it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler

STEPS = 4
PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        # Rejected answers of varied length: padding differs between ranks.
        "rejected": f" {2 * i + 1}" + ", or maybe not" * (i % 4) + ".",
    }
    for i in range(16)
]


def main(model_dir: str, out_dir: str, batch: int) -> None:
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.core.shards import main_process_only, process_rank
    from axolotl_prefalign.integrations.axolotl.trainers.dpo import PrefAlignDPOTrainer

    class Recording(PrefAlignDPOTrainer):
        """Records each training micro-batch's margins and the τ used for them."""

        records: list[dict] = []

        def _get_train_sampler(self, *args, **kwargs):
            # In order: rank r's k-th batch is rows [(kW + r)B, (kW + r + 1)B), so
            # the one-process run with batch W·B sees the union of every step.
            return SequentialSampler(self.train_dataset)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner = self.pref_step.spa_confidence

            def recording(m_g, *, beta, training, progress):
                confident, alpha = inner(
                    m_g, beta=beta, training=training, progress=progress
                )
                if training:
                    self.records.append(
                        {
                            "step": self.state.global_step,
                            "margins": (beta * m_g.detach().float()).tolist(),
                            "tau": self.pref_step.spa_metrics["spa/threshold"],
                            "confident": confident.tolist(),
                        }
                    )
                return confident, alpha

            self.pref_step.spa_confidence = recording

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    prefalign = PrefAlignConfig.from_raw(
        {
            "loss": "spa",
            "spa": {
                "iteration": 1,  # DND on (λ = 1/2): the reference pass runs too
                "noise_quantile": 0.3,
                "margin_window": 2,  # micro-batches: old ones leave the window
                "alpha_warmup_ratio": 0.0,
            },
        }
    )
    args = AxolotlDPOConfig(
        output_dir=str(Path(out_dir) / "trainer"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=64,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = Recording(
        model,
        None,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tok,
        prefalign=prefalign,
    )
    # TRL copied the adapter into a frozen "ref" one; move the trained one away
    # from it (the same on every rank) so that margins differ from the start.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".default." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    trainer.train()
    rank, world = process_rank()
    result = {
        "rank": rank,
        "world_size": world,
        "accelerator_processes": trainer.accelerator.num_processes,
        "backend": str(trainer.accelerator.state.backend),
        "records": trainer.records,
        "log_history": trainer.state.log_history,
        "main_process_only": main_process_only("mp_spa_dpo pipeline guard"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
