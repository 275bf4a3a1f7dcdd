"""Parts 1 and 4 of gpu_check.py: per-token log-probs of one lm_head, the fused path
(and cut-cross-entropy's) against the plain full-logits path and fp32 from the same
bf16 inputs: values, gradients, time and memory."""

from __future__ import annotations

import gc
import statistics
import time

from gpu_check_measure import sync
from gpu_check_records import emit
from gpu_check_settings import TOLERANCE
from workload import GIB


def _errors(torch, value, ref) -> dict:
    diff = (value.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-30)
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / scale).item(),
        "rel_norm": (diff.norm() / ref.double().norm().clamp_min(1e-30)).item(),
    }


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
        sync(torch, cuda)
        t0 = time.perf_counter()
        _run_logprobs(torch, fn, problem, head_grad=False)
        sync(torch, cuda)
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
