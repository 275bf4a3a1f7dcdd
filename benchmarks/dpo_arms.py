"""The two arms of gpu_check.py's DPO step, on one batch layout: TRL's own
`DPOTrainer._compute_loss` (stock) and `core.preference.PreferenceStep` (ours).
memory_ranks.py and memory_predict.py run the same arms."""

from __future__ import annotations

import tempfile

BETA = 0.1


def pair_batch(torch, seq: int, vocab: int, device: str, seed: int) -> dict:
    """One pair in TRL's collator layout: [chosen; rejected], prompt + response =
    `seq` tokens each, the prompt a quarter, each response ending in EOS (id 2)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = max(1, seq // 4)
    response_len = seq - prompt_len
    prompt = torch.randint(3, vocab, (prompt_len,), generator=gen)
    rows = []
    for _ in range(2):
        response = torch.randint(3, vocab, (response_len,), generator=gen)
        response[-1] = 2
        rows.append(torch.cat([prompt, response]))
    completion = torch.cat(
        [torch.zeros(prompt_len, dtype=torch.long), torch.ones(response_len).long()]
    )
    return {
        "input_ids": torch.stack(rows).to(device),
        "attention_mask": torch.ones(2, seq, dtype=torch.long, device=device),
        "completion_mask": torch.stack([completion, completion]).to(device),
    }


def trl_args(*, cuda: bool, gc_kwargs: dict):
    """TRL's DPOConfig for this run, or the reason TRL cannot be used. Made before
    the Accelerator: TrainingArguments resets accelerate's state, as in TRL."""
    try:
        from trl import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken dependency
        return None, f"{type(exc).__name__}: {exc}"[:300]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_"),
        beta=BETA,
        loss_type=["sigmoid"],
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=gc_kwargs,
        max_length=None,
        report_to=[],
    )
    return args, None


def stock_loss(model, accelerator, args):
    """TRL's own `DPOTrainer._compute_loss`, bound to an object holding what it
    reads (the attributes `DPOTrainer.__init__` sets from `DPOConfig`, `args` from
    `trl_args`). Returns (loss_fn, about), `about["impl"]` naming the TRL release;
    loss_fn(batch) -> (loss, chosen log-prob, rejected log-prob), the log-probs
    read back from TRL's own metrics. A TRL that reads state this object lacks
    fails with AttributeError, recorded in the row: no copy of the loss stands in.
    """
    from collections import defaultdict

    import torch
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    shim = DPOTrainer.__new__(DPOTrainer)
    shim.args = args
    # HF Trainer keeps the unwrapped model (the reference pass runs it) and hands
    # the wrapped one (a DeepSpeed engine, say) to compute_loss.
    shim.model = accelerator.unwrap_model(model)
    shim.ref_model = None
    shim.accelerator = accelerator
    shim.beta = args.beta
    shim.precompute_ref_logps = args.precompute_ref_log_probs
    shim.loss_types = args.loss_type
    shim.loss_weights = args.loss_weights or [1.0] * len(shim.loss_types)
    shim.ld_alpha = args.ld_alpha
    shim.f_divergence_type = args.f_divergence_type
    shim.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    shim.label_smoothing = args.label_smoothing
    shim.use_weighting = args.use_weighting
    shim.use_liger_kernel = False
    shim.aux_loss_enabled = False
    shim.router_aux_loss_coef = 0.0
    shim._tp_size = 1  # TRL >= 1.14: tensor-parallel degree
    shim._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    shim._total_train_tokens = 0

    def trl_loss(batch):
        loss = shim._compute_loss(model, batch, False)
        logged = shim._metrics["train"]
        chosen = torch.tensor([float(logged["logps/chosen"][-1])])
        rejected = torch.tensor([float(logged["logps/rejected"][-1])])
        return loss, chosen, rejected

    return trl_loss, {"impl": f"trl {trl.__version__} DPOTrainer._compute_loss"}


class OneRankAccelerator:
    """What TRL's `_compute_loss` asks of its accelerator, for a process that has
    none (memory_ranks.py's ranks): the device, the model inside a DeepSpeed
    engine, and gathers that keep this rank's values (TRL gathers only the
    scalars it logs)."""

    def __init__(self, device: str = "cpu"):
        import torch

        self.device = torch.device(device)

    @staticmethod
    def unwrap_model(model):
        return getattr(model, "module", model)

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


def ours_loss(model, accelerator, *, packing: bool):
    """core.preference.PreferenceStep; reference = the PEFT model, adapter disabled
    (what PrefAlignDPOTrainer passes for a fresh adapter), plus its metric log."""
    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.core.preference import PreferenceStep

    def reference(m):
        unwrapped = accelerator.unwrap_model(m)
        return unwrapped, unwrapped.disable_adapter()

    step = PreferenceStep(PrefAlignConfig(loss="sigmoid", packing=packing), reference)
    calls = [0]

    def loss_fn(batch):
        out = step(model, batch, beta=BETA, training=True, step=calls[0], max_steps=99)
        calls[0] += 1
        for value in out.metrics.values():  # PrefAlignDPOTrainer._log_metrics
            if hasattr(value, "mean"):
                value.mean().item()
        batch["attention_mask"].sum().item()
        return out.losses.mean(), out.chosen_logps.detach(), out.rejected_logps.detach()

    name = "axolotl_prefalign.core.preference.PreferenceStep"
    return loss_fn, {"impl": name + (" (packing)" if packing else " (padded)")}
