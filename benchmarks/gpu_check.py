"""The GPU numbers in one prepared, time-boxed run (`gpu_check.sh`).

Parts, each in its own subprocess with a timeout, each recorded in ONE JSON whether it
passes, fails, times out or is skipped (a failing part never stops the others):

    setup           the carried wheels into a --target dir, nvidia-smi, versions
    fused_vs_plain  core.logprobs.token_logprobs vs the plain full-logits path, bf16:
                    values and gradients w.r.t. hidden states and lm_head, both also
                    against an fp32 computation from the same bf16 inputs; time, memory
    dpo_step        QLoRA DPO step of a Llama-3-8B-shaped NF4 model, LoRA r=16,
                    2048 + 2048 tokens, under a 24 GiB cap: stock vs ours padded vs
                    ours packed, 2 warm-up + 3 timed steps each: peak GiB, tokens/s,
                    MFU (6·N)
    max_length      the longest length per side that fits under the cap (time-boxed,
                    in the same process right after each configuration's dpo_step)
    cce             cut-cross-entropy's per-token log-probs against ours (optional)

"stock" is TRL's own `DPOTrainer._compute_loss` (the loss Axolotl's `rl: dpo` runs:
full-vocabulary logits, fp32 log-softmax, gather, reference pass with the adapter
disabled, sigmoid loss), called on a trainer object that holds only what that method
reads; where TRL cannot be imported the stock rows say `skipped` and why. "ours" is
`core.preference.PreferenceStep`. Both run in the same plain loop, which does what
TRL + Axolotl's trainer do around the loss (see docs/gpu.md), on workload.py's model.

    python benchmarks/gpu_check.py --out DIR              # CUDA, the real shapes
    python benchmarks/gpu_check.py --out DIR --dry-run    # CPU, tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import workload
from dpo_arms import (  # noqa: F401 - other benchmarks import them from here
    BETA,
    OneRankAccelerator,
    ours_loss,
    pair_batch,
    stock_loss,
    trl_args,
)
from workload import GIB, LLAMA3_8B, REPO, TINY_LLAMA

CONFIGS = ("stock", "prefalign", "prefalign_packed")
PARTS = ("setup", "fused_vs_plain", "dpo_step", "max_length", "cce")
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "trl",
    "datasets",
    "pyarrow",
    "pydantic",
    "triton",
    "cut-cross-entropy",
)
# Modules the GPU run needs that its image may lack (their wheels: gpu_wheels.sh).
NEEDED_MODULES = (
    "bitsandbytes",
    "pydantic",
    "trl",
    "datasets",
    "cut_cross_entropy",
)

# What is measured where. Times are seconds; budgets are what each part may take.
SETTINGS = {
    "gpu": {
        "device": "cuda",
        "model": LLAMA3_8B,
        "seq": 2048,
        "warmup": 2,
        "steps": 3,
        "cap_gib": 24.0,
        "lengths": [3072, 4096, 6144, 8192, 12288, 16384],
        "fake_oom_above": None,
        "gc_collect_per_step": True,
        # The lm_head of the 8B shape, one pair of 2 x 2048 tokens.
        "logprob_shape": {"tokens": 4096, "hidden": 4096, "vocab": 128256},
        "budget": {
            "setup": 90,
            "fused_vs_plain": 75,
            # One configuration's worker up to the end of its timed steps (imports,
            # 8B build, NF4, 5 steps): the first guess; later ones use the longest
            # seen. Its worker may take up to dpo_main_max before it is killed.
            "dpo_main": 90,
            "dpo_main_max": 200,
            "search_max": 80,
            "cce": 60,
        },
    },
    "dry": {
        "device": "cpu",
        "model": TINY_LLAMA,
        "seq": 64,
        "warmup": 1,
        "steps": 2,
        "cap_gib": None,
        "lengths": [96, 128, 192, 256],
        # The CPU cannot run out of memory at these sizes: above this length per
        # side a step raises OutOfMemoryError after its forward (marked simulated),
        # so the search's OOM path runs too.
        "fake_oom_above": 128,
        # 0.3 s a call in a process that has TRL imported, on this CPU: skipped.
        "gc_collect_per_step": False,
        "logprob_shape": {"tokens": 256, "hidden": 64, "vocab": 1000},
        "budget": {
            "setup": 40,
            "fused_vs_plain": 40,
            "dpo_main": 12,
            "dpo_main_max": 60,
            "search_max": 10,
            "cce": 40,
        },
    },
}
# The fused path must be no less accurate than the plain one, both measured against
# fp32 from the same bf16 inputs (factor x the plain path's error + slack), and must
# stay within an absolute distance of the plain path.
TOLERANCE = {
    "dtype": "bfloat16",
    "vs_fp32_factor": 1.5,
    "vs_fp32_slack": 1e-3,
    "logps_max_abs_vs_plain": 0.25,
    "grad_rel_norm_vs_plain": 2e-2,
    "means": (
        "passed iff for the per-token log-probs max|fused-fp32| <= 1.5 x "
        "max|plain-fp32| + 1e-3 and max|fused-plain| <= 0.25 nats, and for each "
        "gradient (hidden, lm_head weight) ||fused-fp32||/||fp32|| <= 1.5 x "
        "||plain-fp32||/||fp32|| + 1e-3 and ||fused-plain||/||plain|| <= 2e-2"
    ),
}


# -- small helpers -----------------------------------------------------------------
def emit(kind: str, payload: dict) -> None:
    """A worker's result line; the driver reads every `RECORD` line, in order."""
    print("RECORD " + json.dumps({"kind": kind, **payload}, default=str), flush=True)


def versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _sync(torch, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _errors(torch, value, ref) -> dict:
    diff = (value.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-30)
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / scale).item(),
        "rel_norm": (diff.norm() / ref.double().norm().clamp_min(1e-30)).item(),
    }


def _peak_gib(torch, cuda: bool) -> float:
    """CUDA: max allocated since the last reset. CPU (dry run): the process's max
    resident set so far, a stand-in that is positive but not per step."""
    if cuda:
        return torch.cuda.max_memory_allocated() / GIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _is_oom(torch, exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


# -- part 1 and part 4: per-token log-probs of one lm_head ---------------------------
def _logprob_problem(torch, shape: dict, device: str):
    """bf16 hidden states (unit scale, as after RMSNorm), an lm_head whose logits have
    std ~2, labels: a quarter ignored (the prompt), half of the rest the argmax token
    (confident, p_y near 1), the others random; a random upstream gradient."""
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    hidden = randn(n, h).to(torch.bfloat16)
    weight = (randn(v, h) * (2.0 / h**0.5)).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    with torch.no_grad():
        wf = weight.float()
        top = torch.cat(
            [(rows.float() @ wf.t()).argmax(-1) for rows in hidden.split(512)]
        )
        del wf
    confident = slice(n // 4, n // 4 + (n - n // 4) // 2)
    labels[confident] = top[confident]
    labels[: n // 4] = -100
    upstream = randn(n)
    return hidden, weight, labels, upstream


def _run_logprobs(torch, fn, problem, *, head_grad: bool, dtype=None):
    """fn(hidden, weight, labels) -> per-token log-probs; its value and gradients
    (w.r.t. the head too when `head_grad`) for the problem's upstream gradient."""
    hidden, weight, labels, upstream = problem
    dtype = dtype or hidden.dtype
    x = hidden.to(dtype).clone().requires_grad_(True)
    w = weight.to(dtype).clone().requires_grad_(head_grad)
    out = fn(x, w, labels)
    (out.float() * upstream).sum().backward()
    return (
        out.detach().float(),
        x.grad.float(),
        w.grad.float() if head_grad else None,
    )


def _time_logprobs(torch, fn, problem, cuda: bool, reps: int = 3) -> dict:
    """fwd+bwd time (gradient w.r.t. hidden only: the head is frozen under LoRA)
    and, on CUDA, the memory it takes above what was allocated before."""
    _run_logprobs(torch, fn, problem, head_grad=False)  # warm-up, autotuning
    times = []
    peak = None
    for _ in range(reps):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(torch, cuda)
        t0 = time.perf_counter()
        _run_logprobs(torch, fn, problem, head_grad=False)
        _sync(torch, cuda)
        times.append(time.perf_counter() - t0)
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - base) / GIB
    return {"ms": 1000 * statistics.median(times), "extra_peak_gib": peak}


def fused_fn(chunk_size: int):
    from axolotl_prefalign.core.logprobs import token_logprobs

    def fused(hidden, weight, labels):
        return token_logprobs(hidden, weight, labels, chunk_size=chunk_size)

    return fused


def compare_logprobs(torch, name: str, fn, spec: dict, against=None) -> dict:
    """`fn` against the plain path and against fp32 from the same bf16 inputs (as
    part 1 defines it); with `against` (ours, for part 4) against that too."""
    from axolotl_prefalign.core.logprobs import plain_token_logprobs

    cuda = spec["device"] == "cuda"
    problem = _logprob_problem(torch, spec["logprob_shape"], spec["device"])
    mask = problem[2] != -100
    refs = {
        "plain": _run_logprobs(torch, plain_token_logprobs, problem, head_grad=True),
        "fp32": _run_logprobs(
            torch,
            plain_token_logprobs,
            problem,
            head_grad=True,
            dtype=torch.float32,
        ),
    }
    if against is not None:
        refs["fused"] = _run_logprobs(torch, against, problem, head_grad=True)
    got = _run_logprobs(torch, fn, problem, head_grad=True)
    errors = {}
    for i, what in enumerate(("logps", "grad_hidden", "grad_weight")):
        a, p, r = got[i], refs["plain"][i], refs["fp32"][i]
        if what == "logps":
            a, p, r = a[mask], p[mask], r[mask]
        errors[what] = {
            "vs_plain": _errors(torch, a, p),
            "vs_fp32": _errors(torch, a, r),
            "plain_vs_fp32": _errors(torch, p, r),
        }
        if against is not None:
            f = refs["fused"][i]
            errors[what]["vs_fused"] = _errors(torch, a, f[mask] if i == 0 else f)
    del got, refs
    tol = TOLERANCE

    def no_worse(e: dict, key: str) -> bool:
        limit = tol["vs_fp32_factor"] * e["plain_vs_fp32"][key] + tol["vs_fp32_slack"]
        return e["vs_fp32"][key] <= limit

    checks = {
        "logps_vs_fp32": no_worse(errors["logps"], "max_abs"),
        "logps_vs_plain": errors["logps"]["vs_plain"]["max_abs"]
        <= tol["logps_max_abs_vs_plain"],
    }
    for what in ("grad_hidden", "grad_weight"):
        checks[f"{what}_vs_fp32"] = no_worse(errors[what], "rel_norm")
        checks[f"{what}_vs_plain"] = (
            errors[what]["vs_plain"]["rel_norm"] <= tol["grad_rel_norm_vs_plain"]
        )
    timing = {
        "impl": _time_logprobs(torch, fn, problem, cuda),
        "plain": _time_logprobs(torch, plain_token_logprobs, problem, cuda),
    }
    if against is not None:
        timing["fused"] = _time_logprobs(torch, against, problem, cuda)
    return {
        "impl": name,
        "shape": {**spec["logprob_shape"], "labelled": int(mask.sum())},
        "dtype": "bfloat16",
        "errors": errors,
        "checks": checks,
        "passed": all(checks.values()),
        "time": timing,
    }


def worker_fused(spec: dict) -> None:
    import torch

    from axolotl_prefalign.core.config import PrefAlignConfig

    chunk = PrefAlignConfig().chunk_size
    result = compare_logprobs(torch, "fused", fused_fn(chunk), spec)
    emit("fused_vs_plain", {"status": "ok", "chunk_size": chunk, **result})


def worker_cce(spec: dict) -> None:
    """cut-cross-entropy's -loss (reduction none) as per-token log-probs, against
    the plain path, fp32 and ours: values, gradients, time."""
    import torch

    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.core.logprobs import plain_token_logprobs

    ours = fused_fn(PrefAlignConfig().chunk_size)
    try:
        import cut_cross_entropy as cce
    except ImportError as exc:
        # Skipped. On the dry run the same harness still runs, the plain path
        # standing in for CCE, so that its code cannot rot unnoticed.
        out: dict = {"status": "skipped", "reason": f"cut_cross_entropy: {exc}"}
        if spec.get("dry_run"):
            out["standin"] = compare_logprobs(
                torch, "plain (stand-in)", plain_token_logprobs, spec, against=ours
            )
        emit("cce", out)
        return
    if spec["device"] != "cuda":
        emit("cce", {"status": "skipped", "reason": "CCE's kernels need CUDA"})
        return
    results: dict = {"status": "ok", "version": getattr(cce, "__version__", None)}
    # "high": CCE's default gradient filtering (skips entries below bf16 precision);
    # None: no filtering, the exact gradient.
    for label, eps in (("default", "high"), ("exact", None)):

        def fn(h, w, y, eps=eps):
            loss = cce.linear_cross_entropy(h, w, y, reduction="none", filter_eps=eps)
            return -loss.float() * (y != -100)

        try:
            results[label] = compare_logprobs(
                torch, f"cut_cross_entropy filter_eps={eps}", fn, spec, against=ours
            )
        except Exception as exc:  # noqa: BLE001 - recorded, the rest goes on
            results[label] = {"status": "error", "error": repr(exc)[-2000:]}
    emit("cce", results)


# -- part 2 and part 3: the DPO step ------------------------------------------------


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
    _sync(torch, cuda)
    t0 = time.perf_counter()
    error = None
    try:
        values = run(batch, fake)
        _sync(torch, cuda)
        status = "ok"
    except SimulatedOOM as exc:
        status, values, error = "oom", None, str(exc)
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(torch, exc):
            raise
        status, values, error = "oom", None, str(exc)[:500]
    seconds = time.perf_counter() - t0
    peak = _peak_gib(torch, cuda)
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
        row["peak_reserved_gib"] = (
            torch.cuda.max_memory_reserved() / GIB if cuda else None
        )
    row["impl"] = about["impl"]
    row["main_s"] = time.perf_counter() - started
    row["worker_s"] = time.time() - spec["launched"]
    emit("dpo_step", row)

    # Part 3: longest length per side that fits, one step per length, ascending
    # from --seq (descending when --seq does not fit), stopping at the first misfit
    # or when the next attempt would not end before the time box.
    t_search = time.perf_counter()
    deadline = min(
        time.perf_counter() + spec["search_budget_s"],
        time.perf_counter() + spec["hard_deadline"] - time.time(),
    )
    if status == "ok":
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
            if status == "ok":
                break
            continue
        last = (length, seconds)
        best = length
        if status != "ok":  # going down: the first length that fits is the answer
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
            status = "oom" if cuda and _is_oom(torch, exc) else "error"
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


def worker_info(spec: dict) -> None:
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "versions": versions(),
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "importable": {
            m: importlib.util.find_spec(m) is not None for m in NEEDED_MODULES
        },
    }
    try:
        import bitsandbytes  # noqa: F401

        info["bitsandbytes_import"] = "ok"
    except Exception as exc:  # noqa: BLE001
        info["bitsandbytes_import"] = repr(exc)[-500:]
    if torch.cuda.is_available():
        info.update(workload.gpu_properties())
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()})")
    emit("info", info)


def worker_sleep(spec: dict) -> None:
    """For the tests of the time box: one record, then hang."""
    emit("sleep", {"status": "ok"})
    time.sleep(spec.get("seconds", 60))


WORKERS = {
    "sleep": worker_sleep,
    "info": worker_info,
    "fused_vs_plain": worker_fused,
    "dpo": worker_dpo,
    "cce": worker_cce,
}


# -- the driver ----------------------------------------------------------------------
def _without_kind(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "kind"}


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.settings = SETTINGS["dry" if args.dry_run else "gpu"]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gpu_check.json"
        self.log_path = self.out / "gpu_check.log"
        self.site = Path(args.site_dir)
        self.env = self._env()
        self.proc: subprocess.Popen | None = None
        self.report: dict = {
            "benchmark": "gpu_check",
            "dry_run": args.dry_run,
            "measured": False,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
            "budget_s": args.budget_s,
            "settings": self.settings,
            "tolerance": TOLERANCE,
            "host": {"python": platform.python_version(), "node": platform.node()},
            "device": {},
            "parts": {},
        }

    def _env(self) -> dict:
        env = dict(os.environ)
        path = [str(REPO)]
        if not self.args.dry_run:
            path.insert(0, str(self.site))
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Tiny shapes on a small shared CPU: a second OpenMP thread only waits
        # (steps ran 60x slower with 2 threads while another process ran).
        return workload.set_env_defaults(env, one_thread=self.args.dry_run)

    def log(self, message: str) -> None:
        line = f"[gpu_check {time.time() - self.t0:6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        with self.log_path.open("a") as fh:
            fh.write(line + "\n")

    def write(self) -> None:
        self.report["wall_s"] = time.time() - self.t0
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(self.json_path)

    def left(self) -> float:
        return self.deadline - time.time()

    def on_term(self, signum, frame) -> None:
        """The outer `timeout` (gpu_check.sh) fired: end the worker (it runs in its
        own session, so the signal does not reach it), keep what was measured."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.report["killed"] = f"signal {signum}: the outer time limit"
        self.write()
        os._exit(124)

    def worker(self, name: str, spec: dict, timeout: float) -> dict:
        """Run one worker under a timeout (its whole process group is killed);
        returns its records, status and the tail of its stderr."""
        timeout = min(timeout, self.left() - 3)
        if timeout < 2:
            self.log(f"worker {name}: not started, the budget is spent")
            return {
                "status": "not_run",
                "returncode": None,
                "seconds": 0.0,
                "records": [],
                "stderr_tail": "not started: the budget is spent",
            }
        cmd = [sys.executable, str(Path(__file__)), "--worker", name, json.dumps(spec)]
        self.log(f"worker {name}: start, time box {timeout:.0f}s")
        t0 = time.time()
        with tempfile.TemporaryFile(mode="w+") as err:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=self.env,
                cwd=str(REPO),
                start_new_session=True,
            )
            self.proc = proc
            try:
                stdout, _ = proc.communicate(timeout=timeout)
                status = "ok" if proc.returncode == 0 else "error"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
                status = "timeout"
            self.proc = None
            err.seek(0)
            stderr = err.read()
        with self.log_path.open("a") as fh:
            fh.write(f"----- worker {name} stderr -----\n{stderr}\n")
        records = []
        for line in (stdout or "").splitlines():
            if line.startswith("RECORD "):
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line[len("RECORD ") :]))
        seconds = time.time() - t0
        self.log(
            f"worker {name}: {status} after {seconds:.1f}s, {len(records)} records"
        )
        return {
            "status": status,
            "returncode": proc.returncode,
            "seconds": seconds,
            "records": records,
            "stderr_tail": stderr[-3000:],
        }

    def part(self, name: str, body) -> None:
        """Run one part; whatever happens, it ends up in the JSON."""
        t0 = time.time()
        try:
            result = body()
        except Exception:  # noqa: BLE001 - a broken part must not stop the rest
            result = {"status": "error", "error": traceback.format_exc()[-3000:]}
        result.setdefault("status", "ok")
        result["seconds"] = time.time() - t0
        self.report["parts"][name] = result
        self.write()
        self.log(f"part {name}: {result['status']} in {result['seconds']:.1f}s")

    # -- part 0 --
    def setup(self) -> dict:
        out: dict = {"python": sys.executable}
        if self.args.dry_run:
            out["install"] = "skipped (dry run: the local environment)"
        else:
            out.update(self.install_wheels())
        out["nvidia_smi"] = self.nvidia_smi()
        info = self.worker("info", {}, self.settings["budget"]["setup"] / 2)
        got = [r for r in info["records"] if r["kind"] == "info"]
        if got:
            device = {k: v for k, v in got[-1].items() if k != "kind"}
            device["nvidia_smi"] = out["nvidia_smi"].get("gpu")
            self.report["device"] = device
            self.report["measured"] = bool(
                device.get("cuda_available") and not self.args.dry_run
            )
            if not self.args.dry_run and not device.get("cuda_available"):
                out["status"] = "error"
                out["error"] = "torch sees no CUDA device"
        else:
            out["status"] = "error"
            out["error"] = info["stderr_tail"]
        return out

    def install_wheels(self) -> dict:
        wheels = sorted(Path(self.args.wheels).glob("*.whl"))
        out: dict = {
            "wheel_dir": str(self.args.wheels),
            "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
            "site_dir": str(self.site),
        }
        if not wheels:
            out["install"] = "none: no wheels (run benchmarks/gpu_wheels.sh .whl here)"
            return out
        self.site.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(self.site),
            *map(str, wheels),
        ]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=min(self.settings["budget"]["setup"] * 0.6, self.left()),
            )
            if proc.returncode == 0:
                out["install"] = "pip --target"
                return out
            out["pip_error"] = (proc.stdout + proc.stderr)[-1500:]
        except (OSError, subprocess.SubprocessError) as exc:
            out["pip_error"] = repr(exc)
        # pip missing or broken: a wheel is a zip; unpacking it is installing it.
        for w in wheels:
            with zipfile.ZipFile(w) as zf:
                zf.extractall(self.site)
        out["install"] = "unzipped (pip failed)"
        return out

    def nvidia_smi(self) -> dict:
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit"
        out = {}
        for key, cmd in (
            ("gpu", ["nvidia-smi", query, "--format=csv,noheader"]),
            ("full", ["nvidia-smi"]),
        ):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                out[key] = (proc.stdout or proc.stderr).strip()[-4000:]
            except (OSError, subprocess.SubprocessError) as exc:
                out[key] = f"unavailable: {exc}"
        return out

    # -- part 1 --
    def fused(self) -> dict:
        run = self.worker(
            "fused_vs_plain",
            self.spec(),
            self.settings["budget"]["fused_vs_plain"],
        )
        return self.single(run, "fused_vs_plain")

    def single(self, run: dict, kind: str) -> dict:
        got = [r for r in run["records"] if r["kind"] == kind]
        if got:
            return {k: v for k, v in got[-1].items() if k != "kind"}
        return {
            "status": run["status"] if run["status"] != "ok" else "error",
            "error": run["stderr_tail"],
        }

    def spec(self, **extra) -> dict:
        return {**self.settings, "dry_run": self.args.dry_run, **extra}

    # -- parts 2 and 3 --
    def dpo(self) -> None:
        """Parts 2 and 3: one worker per configuration (on the CPU, one for all),
        each given what is left after the others' expected needs and part 4."""
        budget = self.settings["budget"]
        reserve = budget["cce"] + 10  # part 4 and the final write
        rows: dict = {}
        searches: dict = {}
        t0 = time.time()
        groups = [list(CONFIGS)] if self.args.dry_run else [[c] for c in CONFIGS]
        main_s = float(budget["dpo_main"])  # expected per configuration
        for i, group in enumerate(groups):
            k, later = len(group), sum(len(g) for g in groups[i + 1 :])
            avail = self.left() - reserve - main_s * later
            slack = avail - main_s * k
            search = max(0.0, min(budget["search_max"], slack / (k + later)))
            timeout = min(avail, (budget["dpo_main_max"] + search) * k)
            if timeout < 0.5 * main_s * k:
                run = {"status": "not_run", "records": [], "stderr_tail": "no time"}
            else:
                launched = time.time()
                spec = self.spec(
                    configs=group,
                    search_budget_s=search,
                    launched=launched,
                    hard_deadline=launched + timeout - 5,
                )
                run = self.worker("dpo", spec, timeout)
            for r in run["records"]:
                if r["kind"] == "dpo_step":
                    rows[r["config"]] = _without_kind(r)
                    if r.get("worker_s"):
                        main_s = max(main_s if i else 0.0, r["worker_s"] / k)
                elif r["kind"] == "max_length":
                    searches[r["config"]] = _without_kind(r)
            for name in group:
                if name not in rows:
                    rows[name] = {
                        "config": name,
                        "status": run["status"] if run["status"] != "ok" else "error",
                        "error": run["stderr_tail"],
                    }
                if name not in searches:
                    searches[name] = {
                        "config": name,
                        "status": "not_run",
                        "reason": f"worker {run['status']} before the search",
                    }
            self.report["parts"]["dpo_step"] = self.dpo_summary(rows, time.time() - t0)
            self.report["parts"]["max_length"] = self.search_summary(searches, rows)
            self.write()
        self.log(
            "part dpo_step: " + ", ".join(f"{k} {v['status']}" for k, v in rows.items())
        )

    def dpo_summary(self, rows: dict, seconds: float) -> dict:
        peak = self.report["device"].get("peak_bf16_tflops")
        stock = rows.get("stock", {})
        for r in rows.values():
            if peak and "model_tflops" in r:
                r["mfu"] = r["model_tflops"] / peak
            if r.get("tokens_per_s") and stock.get("tokens_per_s"):
                r["speedup_vs_stock"] = r["tokens_per_s"] / stock["tokens_per_s"]
            if r.get("peak_gib") and stock.get("peak_gib"):
                r["memory_vs_stock"] = r["peak_gib"] / stock["peak_gib"]
        ok = [r for r in rows.values() if r.get("status") == "ok"]
        status = "ok" if len(ok) == len(CONFIGS) else ("partial" if ok else "error")
        return {
            "status": status,
            "seconds": seconds,
            "rows": rows,
            "agreement": self.agreement(rows),
            "n_params_flops": self.flops_n(),
        }

    def flops_n(self) -> int:
        return workload.flops_params(self.settings["model"])

    def agreement(self, rows: dict) -> dict:
        """Ours vs stock on the same model, data and seed: the step-0 log-probs
        (policy = reference, so TRL's full-logits path against the fused one over
        the whole model) and the losses of every step."""
        stock = rows.get("stock", {})
        out = {}
        for name in ("prefalign", "prefalign_packed"):
            r = rows.get(name, {})
            if "logps" not in r or "logps" not in stock:
                continue
            s0, o0 = stock["logps"][0], r["logps"][0]
            out[name] = {
                "logps_step0_max_rel_diff": max(
                    abs(a - b) / max(abs(b), 1e-30) for a, b in zip(o0, s0, strict=True)
                ),
                "loss_max_abs_diff": max(
                    abs(a - b)
                    for a, b in zip(r["losses"], stock["losses"], strict=True)
                ),
            }
        return out

    def search_summary(self, searches: dict, rows: dict) -> dict:
        ok = [s for s in searches.values() if s.get("status") == "ok"]
        status = "ok" if len(ok) == len(CONFIGS) else ("partial" if ok else "error")
        return {
            "status": status,
            "seconds": sum(s.get("seconds", 0.0) for s in searches.values()),
            "cap_gib": self.settings["cap_gib"],
            "rows": searches,
        }

    # -- part 4 --
    def cce(self) -> dict:
        run = self.worker("cce", self.spec(), self.settings["budget"]["cce"])
        return self.single(run, "cce")

    # -- all --
    def table(self) -> str:
        rows = self.report["parts"].get("dpo_step", {}).get("rows", {})
        search = self.report["parts"].get("max_length", {}).get("rows", {})
        cap = self.settings["cap_gib"]
        lines = [
            "| config | status | peak GiB | tokens/s | vs stock | MFU | max seq/side"
            + (f" under {cap:g} GiB |" if cap else " |"),
            "|---|---|---|---|---|---|---|",
        ]
        for name in CONFIGS:
            r = rows.get(name, {"status": "not_run"})

            def fmt(key, spec, r=r):
                return format(r[key], spec) if r.get(key) is not None else ""

            lines.append(
                f"| {name} | {r['status']} | {fmt('peak_gib', '.2f')} "
                f"| {fmt('tokens_per_s', '.0f')} | {fmt('speedup_vs_stock', '.2f')} "
                f"| {fmt('mfu', '.1%')} "
                f"| {search.get(name, {}).get('max_seq_per_side', '')} |"
            )
        return "\n".join(lines)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        self.log(f"budget {self.args.budget_s:.0f}s, out {self.out}")
        self.write()
        self.part("setup", self.setup)
        self.part("fused_vs_plain", self.fused)
        try:
            self.dpo()
        except Exception:  # noqa: BLE001
            self.report["parts"]["dpo_step"] = {
                "status": "error",
                "error": traceback.format_exc()[-3000:],
            }
        self.report["parts"].setdefault(
            "max_length", {"status": "error", "error": "dpo part failed"}
        )
        self.part("cce", self.cce)
        self.report["table"] = self.table()
        statuses = {k: v.get("status") for k, v in self.report["parts"].items()}
        self.report["statuses"] = statuses
        self.write()
        print(self.table())
        print(json.dumps(statuses))
        print(f"wrote {self.json_path} ({time.time() - self.t0:.1f}s)")
        return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run, seconds")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels")
    ap.add_argument(
        "--site-dir",
        default=os.path.join(tempfile.gettempdir(), "gpu_check_site"),
        help="where the wheels are installed (pip --target)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 150.0 if args.dry_run else 440.0
    if not args.worker and not args.out:
        ap.error("--out is required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec or "{}"))
        return 0
    return Driver(args).run()


if __name__ == "__main__":
    sys.exit(main())
