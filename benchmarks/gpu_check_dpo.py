"""Parts 2 and 3 of gpu_check.py, in one worker process per configuration: the QLoRA
DPO step (warm-up and timed steps: peak memory, tokens/s, model TFLOP/s) and, right
after it, the longest length per side that fits under the memory cap."""

from __future__ import annotations

import gc
import statistics
import time
import traceback

import workload
from dpo_arms import ours_loss, pair_batch, stock_loss, trl_args
from gpu_check_measure import is_oom, peak_gib, sync
from gpu_check_records import emit
from workload import GIB


class SimulatedOOM(Exception):
    pass


def _prepare(torch, spec: dict, accelerator):
    """workload's QLoRA model (NF4 base, LoRA r=16 all-linear, as TRL's DPOTrainer
    + HF Trainer leave it, checkpointing non-reentrant) and AdamW."""
    cuda = spec["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    # seq sets max_position_embeddings: make it cover the longest search length.
    shapes = {**spec["model"], "seq": max([spec["seq"], *spec["lengths"]])}
    shapes["attn"] = "sdpa"
    t0 = time.perf_counter()
    base, n_quantized = workload.build_model(shapes, spec["device"], dtype)
    build_s = time.perf_counter() - t0
    gc_kwargs = {"use_reentrant": False}
    model, params = workload.lora_for_training(base, dtype, gc_kwargs, accelerator)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    info = {
        "build_s": build_s,
        "linears_nf4": n_quantized,
        "lora_params": sum(p.numel() for p in params),
        "lora_dtype": str(dtype).replace("torch.", ""),
    }
    return model, params, optimizer, info


def _train_step(torch, loss_fn, batch, params, optimizer, cuda, fake_oom, collect):
    """What HF Trainer + AxolotlDPOTrainer.training_step do for one micro-batch."""
    loss, chosen, rejected = loss_fn(batch)
    if fake_oom:
        raise SimulatedOOM("out of memory (simulated: dry run)")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if collect:  # AxolotlDPOTrainer.training_step, for both trainers
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return loss.item(), chosen.float().sum().item(), rejected.float().sum().item()


def _timed_step(torch, run, seq: int, seed: int, cuda: bool, spec: dict):
    """One step at `seq`: (status, seconds, peak GiB, step outputs or error)."""
    limit = spec.get("fake_oom_above")
    fake = limit is not None and seq > limit
    batch = pair_batch(torch, seq, spec["model"]["vocab"], spec["device"], seed)
    if spec["gc_collect_per_step"]:
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(torch, cuda)
    t0 = time.perf_counter()
    error = None
    try:
        values = run(batch, fake)
        sync(torch, cuda)
        status = "ok"
    except SimulatedOOM as exc:
        status, values, error = "oom", None, str(exc)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(torch, exc):
            raise
        status, values, error = "oom", None, str(exc)[:500]
    seconds = time.perf_counter() - t0
    peak = peak_gib(torch, cuda)
    del batch
    return status, seconds, peak, values, error


def _cleanup(torch, optimizer, cuda: bool) -> None:
    """After an OOM: drop gradients and whatever the failed step left behind."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _skip_stock(name: str, spec: dict, reason: str) -> None:
    """The stock rows when TRL cannot be imported: skipped, with the reason."""
    why = f"TRL's DPOTrainer cannot be imported: {reason}"
    emit("dpo_step", {"config": name, "status": "skipped", "reason": why})
    emit("max_length", {"config": name, "status": "skipped", "reason": why})


def dpo_config(torch, accelerator, name: str, spec: dict, started: float):
    """Part 2 for one configuration, then part 3 in the same process."""
    cuda = spec["device"] == "cuda"
    seq = spec["seq"]
    row: dict = {
        "config": name,
        "seq": seq,
        "packing": name.endswith("packed"),
        "memory_kind": "cuda max_memory_allocated"
        if cuda
        else "cpu process max RSS (dry run)",
    }
    args, reason = spec["_trl"]
    if name == "stock" and args is None:
        _skip_stock(name, spec, reason)
        return
    model, params, optimizer, info = _prepare(torch, spec, accelerator)
    row.update(info)
    row["weights_gib"] = torch.cuda.memory_allocated() / GIB if cuda else None
    if name == "stock":
        loss_fn, about = stock_loss(model, accelerator, args)
    else:
        loss_fn, about = ours_loss(model, accelerator, packing=row["packing"])
    collect = spec["gc_collect_per_step"]

    def run(batch, fake):
        return _train_step(
            torch, loss_fn, batch, params, optimizer, cuda, fake, collect
        )

    n = spec["warmup"] + spec["steps"]
    times, peaks, losses, logps = [], [], [], []
    status = "ok"
    for i in range(n):
        status, seconds, peak, values, error = _timed_step(
            torch, run, seq, i, cuda, spec
        )
        if status != "ok":
            row.update(status=status, error=error, peak_gib=peak)
            _cleanup(torch, optimizer, cuda)
            break
        times.append(seconds)
        peaks.append(peak)
        losses.append(values[0])
        logps.append(values[1:])
    if status == "ok":
        _summarize_steps(torch, row, spec, times, peaks, losses, logps)
    row["impl"] = about["impl"]
    row["main_s"] = time.perf_counter() - started
    row["worker_s"] = time.time() - spec["launched"]
    emit("dpo_step", row)
    _search_length(torch, run, optimizer, name, spec, status == "ok", times)


def _summarize_steps(torch, row, spec, times, peaks, losses, logps) -> None:
    """The row of a configuration whose steps all ran: times, rates, peaks."""
    cuda = spec["device"] == "cuda"
    seq = spec["seq"]
    timed = times[spec["warmup"] :]
    tokens = 2 * seq
    rate = tokens * len(timed) / sum(timed)
    tflops = 6 * workload.flops_params(spec["model"]) * rate / 1e12
    row.update(
        status="ok",
        step_times_s=times,
        step_s_median=statistics.median(timed),
        tokens_per_step=tokens,
        tokens_per_s=rate,
        model_tflops=tflops,
        losses=losses,
        logps=logps,
    )
    row["peak_gib"] = max(peaks)
    row["peak_gib_timed"] = max(peaks[spec["warmup"] :])
    row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB if cuda else None


def _search_length(torch, run, optimizer, name, spec, fitted: bool, times) -> None:
    """Part 3: the longest length per side that fits, one step per length, going up
    from `seq` (down when `seq` did not fit), stopping at the first misfit or when
    the next attempt would not end before the time box."""
    cuda = spec["device"] == "cuda"
    seq = spec["seq"]
    t_search = time.perf_counter()
    deadline = min(
        time.perf_counter() + spec["search_budget_s"],
        time.perf_counter() + spec["hard_deadline"] - time.time(),
    )
    if fitted:
        lengths = [length for length in spec["lengths"] if length > seq]
        best = seq
    else:
        lengths = [seq // 2, seq // 4]
        best = None
    attempts = []
    last = (seq, statistics.median(times) if times else 1.0)
    for j, length in enumerate(lengths):
        estimate = 1.3 * last[1] * (length / last[0]) ** 1.2 + 1.0
        if time.perf_counter() + estimate > deadline:
            attempts.append(
                {"seq": length, "status": "not_tried", "reason": "time box"}
            )
            break
        st, seconds, peak, _values, error = _timed_step(
            torch, run, length, 100 + j, cuda, spec
        )
        attempt = {"seq": length, "status": st, "seconds": seconds, "peak_gib": peak}
        if error:
            attempt["error"] = error
        attempts.append(attempt)
        if st != "ok":
            _cleanup(torch, optimizer, cuda)
            if fitted:
                break
            continue
        last = (length, seconds)
        best = length
        if not fitted:  # going down: the first length that fits is the answer
            break
    emit(
        "max_length",
        {
            "config": name,
            "status": "ok",
            "max_seq_per_side": best,
            "cap_gib": spec["cap_gib"],
            "attempts": attempts,
            "seconds": time.perf_counter() - t_search,
        },
    )


def worker_dpo(spec: dict) -> None:
    """Parts 2 and 3 for each of spec["configs"] in turn, under the memory cap."""
    import torch
    from accelerate import Accelerator

    cuda = spec["device"] == "cuda"
    if cuda and spec["cap_gib"]:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(spec["cap_gib"] * GIB / total, 1)
        )
    spec = {**spec, "_trl": (None, "not needed")}
    if "stock" in spec["configs"]:
        spec["_trl"] = trl_args(cuda=cuda, gc_kwargs={"use_reentrant": False})
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    for name in spec["configs"]:
        started = time.perf_counter()
        try:
            dpo_config(torch, accelerator, name, spec, started)
        except Exception as exc:  # noqa: BLE001 - recorded; the next config runs
            status = "oom" if cuda and is_oom(torch, exc) else "error"
            emit(
                "dpo_step",
                {
                    "config": name,
                    "status": status,
                    "error": traceback.format_exc()[-3000:],
                },
            )
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
