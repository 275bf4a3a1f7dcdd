"""Plain vs fused vs TRL 1.16's chunked token log-probs: peak memory and time.

    python benchmarks/logprob_path.py            # the full grid
    python benchmarks/logprob_path.py --quick    # a small subset
    python benchmarks/logprob_path.py --train-head   # the head trains too
    python benchmarks/logprob_path.py --case 128256:2x2048:2048 --case ...

Paths: `plain` (full logits, log_softmax, gather), `fused` (ours: on the CPU blocks
of 512 rows × 2048 vocabulary columns, unless --chunk-size / --vocab-tile), `trl`
(TRL 1.16.0's `trl.kernels.ChunkedLogProbFunction` with its default tile of 4096
tokens × 32768 vocabulary columns) and `trl_8192` (the same
with 8192 columns). TRL comes from a side folder (`--trl-site`, default
benchmarks/.trl116, installed there with `pip install --no-deps --target` on first
use), so the project's own TRL stays as Axolotl pins it; off CUDA it runs its torch
fold (no Triton). By `--impls` only: `fused_untiled` (ours before the vocabulary
tiling: rows from V, all of V per block) and `products_only` (the two
vocabulary-sized products z = h Wᵀ and z W alone, no softmax: the time floor of any
exact path with a frozen head; not log-probs).

Each case runs in a fresh subprocess, in which the two paths alternate step by step,
so that load from other processes hits both alike. Times are wall-clock medians; the
CPU time (process time) is reported too, as it is less disturbed by a busy machine.
Forward + backward of Σ log p; gradient w.r.t. the hidden states only (frozen head,
the LoRA case) unless --train-head. fp32 on the CPU, bf16 on CUDA. Every position
carries a label, so the fused path does the same vocabulary work as the plain one (in
training it also skips prompt tokens, which this does not measure).

CPU peak memory is the process's peak RSS during a step over its RSS just before it:
the kernel's high-water mark is reset before every step through /proc/self/clear_refs
(where that is refused, each path runs in its own process and only its first step's
peak counts). On CUDA it is torch.cuda.max_memory_allocated over the memory allocated
before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VOCABS = (32000, 128256)
TRL_VERSION = "1.16.0"
TRL_SITE = HERE / ".trl116"
IMPLS = ("plain", "fused", "trl", "trl_8192")
EXTRA_IMPLS = ("fused_untiled", "products_only")  # by --impls only
TOKENS = ((2, 512), (2, 2048), (2, 4096))
HIDDENS = (2048, 4096)
QUICK = [(32000, (2, 512), 2048), (128256, (2, 512), 2048), (32000, (2, 2048), 2048)]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS-before is clean."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """Time the paths in spec["impls"] on one case, alternating step by step so that
    load from other processes hits both alike; return their measurements."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from axolotl_prefalign.core.logprobs import (
        default_chunk_size,
        plain_token_logprobs,
        token_logprobs,
    )

    trl_fn = None
    if any(i.startswith("trl") for i in spec["impls"]):
        sys.path.insert(0, spec["trl_site"])
        from trl.kernels import ChunkedLogProbFunction

        def trl_fn(h, w, y, columns=32768):
            flat = h.reshape(-1, h.shape[-1])
            out = ChunkedLogProbFunction.apply(
                flat, w, None, y.reshape(-1), 1.0, columns, None, 1.0, ()
            )
            return out[0].view(y.shape)

    cuda = spec["device"] == "cuda"
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, seq = spec["tokens"]
    vocab, hid = spec["vocab"], spec["hidden"]
    torch.manual_seed(0)
    # In-place init: no temporary that would raise the peak before we measure.
    weight = torch.empty(vocab, hid, dtype=dtype, device=device).normal_(0, 0.02)
    weight.requires_grad_(spec["train_head"])
    hidden = torch.empty(batch, seq, hid, dtype=dtype, device=device).normal_()
    hidden.requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    fns = {
        "plain": plain_token_logprobs,
        "fused": lambda h, w, y: token_logprobs(
            h, w, y, chunk_size=spec["chunk_size"], vocab_tile=spec.get("vocab_tile")
        ),
        # Ours before the CPU vocabulary tiling: rows from V, the whole vocabulary.
        "fused_untiled": lambda h, w, y: token_logprobs(
            h, w, y, chunk_size=default_chunk_size(vocab), vocab_tile=vocab
        ),
        "products_only": products_only,
        "trl": trl_fn,
        "trl_8192": lambda h, w, y: trl_fn(h, w, y, columns=8192),
    }
    paths = {k: (lambda k=k: fns[k](hidden, weight, labels)) for k in spec["impls"]}
    # One tiny step per path first (BLAS thread pool and allocator start-up), which
    # also checks that every path computes the same log-probs.
    with torch.no_grad():
        ref = plain_token_logprobs(hidden[:, :64], weight, labels[:, :64])
    diffs = {}
    for impl in spec["impls"]:
        lp = fns[impl](hidden[:, :64], weight, labels[:, :64])
        diffs[impl] = (lp.detach().float() - ref.float()).abs().max().item()
        lp.sum().backward()
    results = {k: {"times_s": [], "cpu_s": [], "peaks": []} for k in spec["impls"]}
    for i in range(spec["warmup"] + spec["repeats"]):
        for impl in spec["impls"]:
            hidden.grad = weight.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                _trim_heap()
                resettable = _reset_peak_rss()
                before = _status_kib("VmRSS") * 1024
            start, cpu_start = time.perf_counter(), time.process_time()
            paths[impl]().sum().backward()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            if cuda:
                peak = torch.cuda.max_memory_allocated() - before
            elif resettable:
                peak = _status_kib("VmHWM") * 1024 - before
            elif i == 0:  # ru_maxrss never resets: only a first step is meaningful
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                peak -= before
            else:
                peak = None
            res = results[impl]
            if peak is not None:
                res["peaks"].append(peak)
            if i >= spec["warmup"]:
                res["times_s"].append(elapsed)
                res["cpu_s"].append(cpu)
    for impl, res in results.items():
        res["peak_bytes"] = max(res.pop("peaks"))
        res["max_abs_diff_vs_plain"] = diffs[impl]
    return results


def products_only(hidden, weight, labels, rows: int = 512):
    """The floor of any exact path with a frozen head: the two vocabulary-sized
    products (z = h Wᵀ, then z W), in blocks of `rows`, without the softmax. Returns
    zeros shaped like `labels` whose backward hands back the second product: the
    time of the products alone, NOT log-probs."""
    import torch

    class Products(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            flat = h.reshape(-1, h.shape[-1])
            out = torch.empty_like(flat)
            for start in range(0, flat.shape[0], rows):
                z = flat[start : start + rows] @ w.t()
                torch.mm(z, w, out=out[start : start + rows])
            ctx.save_for_backward(out)
            return h.new_zeros(labels.shape)

        @staticmethod
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            return (out * g.reshape(-1, 1)).view(*labels.shape, -1), None

    return Products.apply(hidden, weight)


def run_case(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def plain_estimate(vocab: int, tokens: tuple[int, int], hid: int, elt: int) -> int:
    """Rough plain-path need: inputs + three [N, V] fp32 tensors (logits, log-softmax,
    their gradient) + the bf16 logits on CUDA."""
    n = tokens[0] * tokens[1]
    return 2 * vocab * hid * elt + n * vocab * (12 + (2 if elt == 2 else 0))


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    info = {
        "device": device,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ram_gb": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        ),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cases(args) -> list[tuple[int, tuple[int, int], int]]:
    if args.quick:
        return QUICK
    if args.case:
        parsed = [c.split(":") for c in args.case]
        return [(int(v), parse_tokens(t), int(h)) for v, t, h in parsed]
    vocabs = args.vocab or VOCABS
    tokens = [parse_tokens(t) for t in args.tokens] or TOKENS
    hiddens = args.hidden or HIDDENS
    return [(v, t, h) for h in hiddens for v in vocabs for t in tokens]


def parse_tokens(text: str) -> tuple[int, int]:
    batch, seq = text.split("x")
    return int(batch), int(seq)


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[dict]) -> str:
    """One line per case and path: peak, time, and the ratios against plain."""
    out = [
        "| V | tokens | H | path | peak MB | time s | plain/path mem "
        "| path/plain time | path/plain CPU time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['vocab']} | {r['tokens'][0]}×{r['tokens'][1]} | {r['hidden']} "
        if "skipped" in r:
            out.append(head + f"| skipped: {r['skipped']} |||||")
            continue
        p = r["plain"]
        for impl in (i for i in IMPLS if i in r):
            x = r[impl]
            out.append(
                head + f"| {impl} | {fmt_mb(x['peak_bytes'])} | {x['median_s']:.2f} "
                f"| {p['peak_bytes'] / x['peak_bytes']:.1f}× "
                f"| {x['median_s'] / p['median_s']:.2f} "
                f"| {x['median_cpu_s'] / p['median_cpu_s']:.2f} |"
            )
    return "\n".join(out)


def ensure_trl(site: Path) -> str:
    """TRL 1.16's kernels in a side folder (installed once, no dependencies)."""
    if not (site / "trl" / "kernels" / "chunked_logprob.py").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(site),
                f"trl=={TRL_VERSION}",
            ],
            check=True,
        )
    version = subprocess.run(
        [sys.executable, "-c", "import trl; print(trl.__version__)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--train-head", action="store_true", help="weight grad too")
    parser.add_argument("--vocab", type=int, nargs="*", help=f"default {VOCABS}")
    parser.add_argument("--tokens", nargs="*", default=[], help="e.g. 2x2048")
    parser.add_argument("--hidden", type=int, nargs="*", help=f"default {HIDDENS}")
    parser.add_argument(
        "--case", action="append", help="V:BxT:H, repeatable; overrides the grid"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=0, help="untimed full steps")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="fused path (default: from V)"
    )
    parser.add_argument(
        "--vocab-tile",
        type=int,
        default=None,
        help="fused path's vocabulary columns per block (default: 2048 on the CPU)",
    )
    parser.add_argument(
        "--impls",
        nargs="*",
        default=list(IMPLS),
        choices=IMPLS + EXTRA_IMPLS,
        help=f"paths (default {IMPLS}; also {EXTRA_IMPLS})",
    )
    parser.add_argument("--trl-site", type=Path, default=TRL_SITE)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, help="JSON path (default results/...)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    sys.path.insert(0, str(REPO))
    from axolotl_prefalign.core.logprobs import block_shape

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elt = 2 if device == "cuda" else 4
    impls = ["plain", *(i for i in args.impls if i != "plain")]
    trl_version = None
    if any(i.startswith("trl") for i in impls):
        trl_version = ensure_trl(args.trl_site)
    rows = []
    for vocab, tokens, hid in cases(args):
        row = {"vocab": vocab, "tokens": list(tokens), "hidden": hid}
        need, have = plain_estimate(vocab, tokens, hid, elt), available_bytes(device)
        if need > 0.85 * have:
            row["skipped"] = (
                f"plain path needs ~{need / 2**30:.1f} GiB, "
                f"{have / 2**30:.1f} GiB available"
            )
            print(f"skip V={vocab} tokens={tokens} H={hid}: {row['skipped']}")
            rows.append(row)
            continue
        row["load_before"] = os.getloadavg()[0]
        spec = dict(
            device=device,
            vocab=vocab,
            tokens=tokens,
            hidden=hid,
            train_head=args.train_head,
            chunk_size=args.chunk_size,
            vocab_tile=args.vocab_tile,
            warmup=args.warmup,
            repeats=args.repeats,
            trl_site=str(args.trl_site),
        )
        if device == "cuda" or _reset_peak_rss():
            measured = run_case({**spec, "impls": impls})
        else:  # no resettable peak: one fresh process per path
            measured = {
                impl: run_case({**spec, "impls": [impl]})[impl] for impl in impls
            }
        for impl, res in measured.items():
            res["median_s"] = statistics.median(res["times_s"])
            res["median_cpu_s"] = statistics.median(res["cpu_s"])
            row[impl] = res
        row["load_after"] = os.getloadavg()[0]
        if "fused" in row:
            row["fused_chunk_size"], row["fused_vocab_tile"] = block_shape(
                vocab, torch.device(device), args.chunk_size, args.vocab_tile
            )
            f = row["fused"]
            for impl in (i for i in impls if i != "fused"):
                row[f"mem_{impl}_over_fused"] = (
                    row[impl]["peak_bytes"] / f["peak_bytes"]
                )
                row[f"time_fused_over_{impl}"] = f["median_s"] / row[impl]["median_s"]
        print("\n".join(table([row]).splitlines()[2:]), flush=True)
        rows.append(row)

    print()
    print(table(rows))
    suffix = "_train_head" if args.train_head else ""
    out = args.out or HERE / "results" / f"logprob_path_{device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(device),
        "settings": {
            "dtype": "bfloat16" if device == "cuda" else "float32",
            "grad": "hidden and head" if args.train_head else "hidden only",
            "chunk_size": args.chunk_size or "default (TILED_CHUNK when tiled)",
            "vocab_tile": args.vocab_tile or "default_vocab_tile(V, device)",
            "impls": impls,
            "trl": trl_version,
            "trl_tiles": {"trl": [4096, 32768], "trl_8192": [4096, 8192]},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "time": "median of repeats, forward + backward",
            "peak": "peak during the step over memory before it",
        },
        "cases": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
