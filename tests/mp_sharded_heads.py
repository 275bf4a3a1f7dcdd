"""The fused log-prob path on one rank of 2 under DeepSpeed ZeRO-3 or FSDP2 (gloo).

    python tests/mp_sharded_heads.py zero3|fsdp RANK PORT OUT

Rank RANK of 2 drives the engine directly (accelerate enables neither on the CPU)
around the tiny Llama of `build`, with `prefalign.loss: spa` (DND on) through
`PreferenceStep`, two steps per model: `batch(step, rank)`, where step 1 is even
(2 pairs per rank) and step 2 uneven (rank 0: 2 pairs, rank 1: 1 pair with no
labelled token). Per model (`CASES`: frozen head under LoRA; trainable head in
`modules_to_save`) and, for FSDP2, per layout (`FSDP_LAYOUTS`), it saves to
OUT/rank<RANK>.pt, per step: each pair's loss, the sequence log-probs, τ and the
full gradient of every trainable parameter. tests/test_sharded_heads.py compares
them with one process (`one_process`) on the same pairs. Not a test module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

VOCAB = 97  # odd: the head's rows split unevenly over 2 ranks
# lora: a frozen head (the reference: the adapter disabled); head: a trainable one
# in PEFT modules_to_save; full: full fine-tuning, the reference a frozen copy;
# tied: the same with the head tied to the input embeddings (SmolLM2, Llama-3.2).
# DeepSpeed ZeRO-3 fails on modules_to_save in its own hooks (`Linear` has no
# `ds_grads_remaining`, before any prefalign code runs), so it trains `full`.
ZERO3_CASES = ("lora", "full", "tied")
FSDP_CASES = ("lora", "head")
FSDP_LAYOUTS = ("root", "head_unit", "tail_group")
STEPS = (1, 2)
BETA = 0.5


def build(case: str):
    """The tiny Llama for `case`; a trained head (and the full policy) starts away
    from the reference's, so that policy and reference differ."""
    from peft import LoraConfig, get_peft_model

    model = base(tied=case == "tied")
    if case in ("full", "tied"):
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        return model
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"] if case == "head" else None,
        init_lora_weights=False,  # B ≠ 0: the policy differs from the reference
    )
    peft = get_peft_model(model, lora)
    if case == "head":
        copy = peft.base_model.model.lm_head.modules_to_save["default"]
        with torch.no_grad():
            copy.weight.add_(0.05 * torch.randn_like(copy.weight))
    return peft


def base(tied: bool = False):
    """conftest's tiny Llama at half its width, the same on every process."""
    from conftest import tiny_llama

    return tiny_llama(
        VOCAB,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


def pairs(step: int) -> list[tuple[list[int], list[int], list[int], bool]]:
    """Step `step`'s pairs in rank order: (prompt, chosen, rejected, labelled)."""
    gen = torch.Generator().manual_seed(step)
    count = 4 if step == 1 else 3

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    out = []
    for i in range(count):
        prompt, chosen = ids(3 + i), ids(2 + 2 * i)
        rejected = ids(3 + (3 * i) % 5)
        # Step 2's last pair (rank 1's only one) has no completion token marked.
        out.append((prompt, chosen, rejected, not (step == 2 and i == count - 1)))
    return out


def rank_slice(step: int, rank: int) -> slice:
    """Which of `pairs(step)` rank `rank` of 2 trains on."""
    if step == 1:
        return slice(2 * rank, 2 * rank + 2)
    return slice(0, 2) if rank == 0 else slice(2, 3)


def batch(rows) -> dict[str, torch.Tensor]:
    """TRL's layout: chosen rows, then rejected rows, right-padded."""
    seqs = [(p, c, lab) for p, c, _, lab in rows] + [
        (p, r, lab) for p, _, r, lab in rows
    ]
    width = max(len(p) + len(c) for p, c, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row, (p, c, labelled) in enumerate(seqs):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        mask[row, : len(p) + len(c)] = 1
        completion[row, len(p) : len(p) + len(c)] = int(labelled)
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}


def preference_step(reference=None):
    """prefalign's SPA step (DND on); the reference: `reference` (a frozen model)
    or, by default, the PEFT model with its adapter disabled."""
    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.core.preference import PreferenceStep

    config = PrefAlignConfig(
        loss="spa",
        chunk_size=4,  # several row chunks per pass
        spa={"iteration": 1, "noise_quantile": 0.3, "margin_window": 4},
    )
    if reference is not None:
        return PreferenceStep(config, lambda m: (reference, contextlib.nullcontext()))
    return PreferenceStep(config, lambda m: (peft_of(m), peft_of(m).disable_adapter()))


def peft_of(model):
    return getattr(model, "module", model)


def run_step(step_fn, model, inputs: dict, step: int) -> dict:
    """One SPA step: its record (per-pair losses, log-probs, τ) and the losses."""
    out = step_fn(model, inputs, beta=BETA, training=True, step=step, max_steps=2)
    record = {
        "losses": out.losses.detach().clone(),
        "chosen": out.chosen_logps.detach().clone(),
        "rejected": out.rejected_logps.detach().clone(),
        "tau": step_fn.spa_metrics["spa/threshold"],
    }
    return record, out.losses


def one_process(case: str) -> dict[int, dict]:
    """The one-process run: both ranks' pairs in one batch, and the gradient of the
    mean over ranks of each rank's mean loss (what data parallelism averages)."""
    model = build(case)
    frozen = case in ("full", "tied")
    step_fn = preference_step(frozen_reference(case) if frozen else None)
    records = {}
    for step in STEPS:
        rows = pairs(step)
        record, losses = run_step(step_fn, model, batch(rows), step)
        per_rank = torch.stack([losses[rank_slice(step, r)].mean() for r in (0, 1)])
        model.zero_grad(set_to_none=True)
        per_rank.mean().backward()
        record["rank_losses"] = per_rank.detach()
        record["grads"] = {
            n: p.grad.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        records[step] = record
    return records


# -- one rank -------------------------------------------------------------------
def frozen_reference(case: str):
    model = base(tied=case == "tied").eval()
    model.requires_grad_(False)
    return model


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,
    # Partition every parameter, however small (the head included).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def zero3_engine(case: str):
    import deepspeed

    model = build(case)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(params, lr=0.0), config=ZERO3_CONFIG
    )
    return engine


def zero3_reference(case: str):
    """The frozen reference as TRL prepares it under ZeRO-3: an engine of its own."""
    import deepspeed

    model = frozen_reference(case)
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3_CONFIG)
    return engine.module


def zero3_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {
        n: safe_get_full_grad(p).detach().clone()
        for n, p in engine.module.named_parameters()
        if p.requires_grad
    }


def fsdp_model(case: str, layout: str):
    """The layouts users get: each decoder layer a unit and the root resharded after
    forward (Axolotl 0.21's fsdp2_prepare_model), plus the lm_head as its own unit
    or accelerate's [norm, lm_head] tail group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = build(case)
    causal = model.base_model.model
    for layer in causal.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    if layout == "head_unit":
        fully_shard(causal.lm_head, mesh=mesh, reshard_after_forward=True)
    elif layout == "tail_group":
        fully_shard(
            [causal.model.norm, causal.lm_head], mesh=mesh, reshard_after_forward=True
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def fsdp_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return grads


def train_rank(engine_name, rank, make, backward, grads, reference=None) -> dict:
    """Two steps of one model on this rank's pairs; records per step."""
    step_fn = preference_step(reference)
    model = make()
    records = {}
    for step in STEPS:
        rows = pairs(step)[rank_slice(step, rank)]
        record, losses = run_step(step_fn, model, batch(rows), step)
        loss = losses.mean()
        backward(model, loss)
        record["grads"] = grads(model)
        record["loss"] = loss.detach()
        records[step] = record
        if engine_name == "zero3":
            model.step()  # lr 0: the weights stay the one-process run's
        else:
            model.zero_grad(set_to_none=True)
    return records


def main(engine_name: str, rank: int, port: int, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    if engine_name == "zero3":
        import deepspeed

        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (g++, about
        # 2 min) when its backend starts; gloo does every collective without it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        for case in ZERO3_CASES:
            results[case] = train_rank(
                engine_name,
                rank,
                lambda case=case: zero3_engine(case),
                lambda m, loss: m.backward(loss),
                zero3_grads,
                None if case == "lora" else zero3_reference(case),
            )
    else:
        for layout in FSDP_LAYOUTS:
            for case in FSDP_CASES:
                results[f"{layout}/{case}"] = train_rank(
                    engine_name,
                    rank,
                    lambda case=case, layout=layout: fsdp_model(case, layout),
                    lambda m, loss: loss.backward(),
                    fsdp_grads,
                )
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    name, rank_arg, port_arg, out_arg = sys.argv[1:5]
    if name == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(name, int(rank_arg), int(port_arg), Path(out_arg))
