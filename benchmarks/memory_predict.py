"""Predicted GPU memory of one QLoRA DPO step: live tensor bytes on the CPU.

A `TorchDispatchMode` (`LiveBytes`) sees every ATen op of one training step and
registers each new storage of its outputs once (views share their base's storage and
are not counted again); a `weakref.finalize` on the storage subtracts its bytes when
it is freed. Live bytes = the model's parameters, buffers, NF4 packed weights and
absmax, LoRA parameters and AdamW states present before the step (the baseline) +
every storage born during the step and not yet freed; the peak is the maximum after
each op. That is what `torch.cuda.max_memory_allocated` would count on a GPU, without
the allocator's rounding, caching or fragmentation (docs/memory_prediction.md).

The step is what benchmarks/gpu_check.py runs on the GPU, with its pieces: NF4 base
(bitsandbytes, compute dtype bf16), LoRA r=16 all-linear in bf16, gradient
checkpointing (non-reentrant), bf16 autocast (accelerate), one pair per step;
loss (policy forward of chosen+rejected, reference pass with the adapter disabled),
backward, clip_grad_norm_, AdamW (foreach, as on CUDA). Configurations:

    stock              TRL's own DPOTrainer._compute_loss (gpu_check.stock_loss)
                       (TRL is needed: no copy of its loss stands in)
    prefalign          core.preference.PreferenceStep, padded batch
    prefalign_packed   the same, packed (one row, position ids restart per sequence)

Two ways of running a step:

    real   the step computed on the CPU (real values, bitsandbytes' CPU NF4 kernels)
    fake   the same Python code under FakeTensorMode: every op's output shape, dtype
           and storage size, no arithmetic (bitsandbytes' registered fake kernels for
           the NF4 ops); the ops on the batch's own index tensors run for real, and
           data-dependent results (`.item()`) read as 1

The full Llama-3-8B width (hidden 4096, MLP 14336, 32/8 heads, vocab 128256) runs
fake at 1, 2 and 4 decoder layers, the peak is fitted as a + b·L and extrapolated to
32 layers, per length; the fake shortcut is checked against a real step at full width
(1 layer, short sequences), the extrapolation against every depth of a small model
(real), and the 32-layer prediction against a fake step of the whole 32-layer model.

    python benchmarks/memory_predict.py            # ~13 min on one core
    python benchmarks/memory_predict.py --quick    # tiny shapes, seconds (tests)
    python benchmarks/memory_predict.py --sharded  # per rank, ZeRO-3 / FSDP2 (~2 min)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import subprocess
import sys
import time
import weakref
from pathlib import Path

import workload
from workload import GIB, HERE, LLAMA3_8B_WIDTH, REPO, RESULTS

workload.set_env_defaults(one_thread=True)  # before torch reads the thread count

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map  # noqa: E402

sys.path.insert(0, str(REPO))

MIB = 2**20
# Under FakeTensorMode, results of real ops above this many elements become fake.
REAL_LIMIT = 2**22
CONFIGS = ("stock", "prefalign", "prefalign_packed")
SETTINGS = {
    "full": {
        "model": LLAMA3_8B_WIDTH,
        "fit_layers": [1, 2, 4],
        "target_layers": 32,
        "seq": 2048,
        "lengths": [1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768],
        "cap_gib": 24.0,
        "length_step": 128,
        # The fake shortcut against a computed step at the full width.
        "real_check": {"layers": 1, "seq": 256},
        # The extrapolation against every depth of a small model, all computed.
        "small": {
            "model": {
                "vocab": 16384,
                "hidden": 512,
                "heads": 8,
                "kv_heads": 2,
                "intermediate": 1792,
            },
            "layers": [1, 2, 4, 8, 16],
            "seq": 256,
        },
        "direct_target": True,
    },
    "quick": {
        "model": {
            "vocab": 512,
            "hidden": 64,
            "heads": 4,
            "kv_heads": 2,
            "intermediate": 128,
        },
        "fit_layers": [1, 2],
        "target_layers": 4,
        "seq": 32,
        "lengths": [32, 64],
        "cap_gib": 0.004,
        "length_step": 8,
        "real_check": {"layers": 1, "seq": 32},
        "small": {
            "model": {
                "vocab": 256,
                "hidden": 32,
                "heads": 4,
                "kv_heads": 2,
                "intermediate": 64,
            },
            "layers": [1, 2, 4],
            "seq": 16,
        },
        "direct_target": True,
    },
}
# Not counted by live bytes, present on a GPU (docs/memory_prediction.md).
GPU_MARGIN_GIB = {
    "cuda_context": 0.75,
    "allocator_and_workspaces": 1.25,
}


# -- the tracker ---------------------------------------------------------------------
def _storage(t):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, op by op: each storage counted once, from the op whose
    output first shows it until it is freed (`weakref.finalize` on the storage,
    whose Python object lives exactly as long as the storage itself).

    `fake`: the FakeTensorMode below this one, if any. Then ops that touch no fake
    tensor (index arithmetic on the batch) run for real outside it, boolean masks
    that are real become index tensors, and `.item()` of a fake tensor reads 1."""

    def __init__(self, fake=None):
        super().__init__()
        self.fake = fake
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_at: dict = {}
        self.ops = 0
        self.phase = ""
        self.largest: dict[str, int] = {}

    # bookkeeping
    def add(self, t, op: str = "baseline") -> None:
        s = _storage(t)
        if s is None:
            return
        key = s._cdata
        if key in self.live:
            return
        n = s.nbytes()
        self.live[key] = n
        self.current += n
        weakref.finalize(s, self._free, key)
        if n > self.largest.get(op, 0):
            self.largest[op] = n

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def add_all(self, tensors) -> int:
        before = self.current
        for t in tensors:
            self.add(t)
        self.peak = max(self.peak, self.current)
        return self.current - before

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_at = {"op": "start", "phase": self.phase}

    # dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs)
        self.ops += 1
        name = str(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            self.add(t, name)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = {"op": name, "phase": self.phase, "op_index": self.ops}
        return out

    def _fake_if_large(self, t):
        if isinstance(t, torch.Tensor) and t.numel() > REAL_LIMIT:
            return self.fake.from_tensor(t)
        return t

    def _run(self, func, args, kwargs):
        if self.fake is None:
            return func(*args, **kwargs)
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        flat = tree_flatten((args, kwargs))[0]
        if not any(isinstance(a, FakeTensor) for a in flat):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            # A large result (the packed layout's [N, N] attention mask) goes on
            # as a fake tensor: its bytes are counted, its users cost nothing.
            return tree_map(self._fake_if_large, out)
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            if dtype == torch.bool:
                return True
            return 1.0 if dtype.is_floating_point else 1
        if func.overloadpacket in _INDEXING:
            args = (args[0], _bool_to_index(args[1]), *args[2:])
        return func(*args, **kwargs)


_INDEXING = {
    torch.ops.aten.index,
    torch.ops.aten.index_put,
    torch.ops.aten.index_put_,
    torch.ops.aten._index_put_impl_,
}


def _bool_to_index(indices):
    """Real boolean masks as the long index tensors they stand for (nonzero has no
    fake result: its size depends on the values, which are real here)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    out = []
    for idx in indices:
        if (
            isinstance(idx, torch.Tensor)
            and idx.dtype == torch.bool
            and not isinstance(idx, FakeTensor)
        ):
            with unset_fake_temporarily():
                out.extend(idx.nonzero().unbind(1))
        else:
            out.append(idx)
    return out


def toy_check() -> dict:
    """The tracker against a hand count: fp32 x[1000] (4000 B) in the baseline;
    y = x*2 (4000), v = y[10:] (a view: 0), z = y.sum() (4), w = zeros(250, int64)
    (2000); del y, v (frees 4000), u = exp(z) (4). Peak = 4000+4000+4+2000 = 10004;
    live at the end 4000+4+2000+4 = 6008."""
    x = torch.ones(1000)
    with LiveBytes() as m:
        m.add_all([x])
        y = x * 2
        v = y[10:]
        z = y.sum()
        w = torch.zeros(250, dtype=torch.int64)
        del y, v
        after_free = m.current
        u = torch.exp(z)
    got = {"peak": m.peak, "live_after_free": after_free, "live_end": m.current}
    want = {"peak": 10004, "live_after_free": 6004, "live_end": 6008}
    del w, u
    return {"got": got, "expected": want, "exact": got == want}


# -- the step ------------------------------------------------------------------------
class Setup:
    """What one process needs once: TRL's DPOConfig (before the Accelerator) and a
    bf16-autocast Accelerator on the CPU."""

    def __init__(self):
        import gpu_check
        from accelerate import Accelerator

        self.gc = gpu_check
        self.gc_kwargs = {"use_reentrant": False}
        self.trl = gpu_check.trl_args(cuda=False, gc_kwargs=self.gc_kwargs)
        self.accelerator = Accelerator(mixed_precision="bf16", cpu=True)


def _quant_tensors(model):
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)


def _nf4_fake_weight(weight, module):
    """What Params4bit._quantize leaves (packed uint8 data + QuantState, blocksize
    64, no double quantization), as a plain frozen Parameter carrying the same
    attributes: Params4bit cannot wrap a FakeTensor. The quantization runs through
    bitsandbytes' registered fake kernel (shapes only)."""
    import bitsandbytes as bnb
    from torch import nn

    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=64,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )
    p = nn.Parameter(packed, requires_grad=False)
    for key, value in {
        "quant_state": state,
        "blocksize": 64,
        "compress_statistics": False,
        "quant_type": "nf4",
        "quant_storage": torch.uint8,
        "bnb_quantized": True,
        "module": module,
    }.items():
        setattr(p, key, value)
    module.quant_state = state
    return p


def build_fake_base(shapes: dict, nf4: bool = True):
    """workload.build_model under FakeTensorMode: the same LlamaForCausalLM in bf16,
    every decoder nn.Linear swapped for a bitsandbytes NF4 Linear4bit (or, with
    `nf4=False`, left in bf16: LoRA on a bf16 base)."""
    model, _ = workload.build_model(
        shapes, "cpu", torch.bfloat16, nf4=nf4, nf4_weight=_nf4_fake_weight
    )
    return model


@contextlib.contextmanager
def _fake_module_to():
    """nn.Module.to under FakeTensorMode: Module._apply swaps each FakeTensor
    parameter for its converted copy, which the mode's weak references forbid
    (even for a no-op move). Everything here is on the CPU already: a move is a
    no-op and a dtype change is done through `.data`."""
    from unittest import mock

    from torch import nn

    def to(self, *args, **kwargs):
        _device, dtype, _nb, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            for t in self.parameters():
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        return self

    with mock.patch.object(nn.Module, "to", to):
        yield


def build(
    setup: Setup,
    model_spec: dict,
    layers: int,
    seq: int,
    fake: bool = False,
    nf4: bool = True,
):
    """The QLoRA model as gpu_check._prepare leaves it on CUDA (bf16 everywhere it
    is not NF4; `nf4=False`, fake only: LoRA on a bf16 base), AdamW (foreach) with
    its states already there (as after step 1)."""
    shapes = {**model_spec, "layers": layers, "seq": seq, "attn": "sdpa"}
    if fake:
        base = build_fake_base(shapes, nf4=nf4)
    else:
        if not nf4:
            raise ValueError("nf4=False is built fake only (no CPU bf16 path here)")
        base, _ = workload.build_model(shapes, "cpu", torch.bfloat16)
    with _fake_module_to() if fake else contextlib.nullcontext():
        model, params = workload.lora_for_training(
            base, torch.bfloat16, setup.gc_kwargs, setup.accelerator
        )
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    for p in params:  # AdamW's own _init_group, without a step
        optimizer.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return model, params, optimizer


def loss_fn(setup: Setup, model, config: str):
    if config == "stock":
        args, reason = setup.trl
        if args is None:
            raise SystemExit(f"stock runs TRL's own DPO loss; TRL: {reason}")
        fn, about = setup.gc.stock_loss(model, setup.accelerator, args)
    else:
        fn, about = setup.gc.ours_loss(
            model, setup.accelerator, packing=config.endswith("packed")
        )
    return fn, about["impl"]


def measure(
    setup: Setup,
    model_spec: dict,
    layers: int,
    seq: int,
    config: str,
    mode,
    nf4: bool = True,
):
    """Live bytes of one step: baseline (before), peak, what is left after."""
    t0 = time.perf_counter()
    fake = None
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode(allow_non_fake_inputs=True)
    ctx = fake if fake is not None else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(0)
        model, params, optimizer = build(
            setup, model_spec, layers, seq, fake=fake is not None, nf4=nf4
        )
    batch = setup.gc.pair_batch(torch, seq, model_spec["vocab"], "cpu", 0)
    fn, impl = loss_fn(setup, model, config)
    tracker = LiveBytes(fake)
    states = [v for s in optimizer.state.values() for v in s.values()]
    tensors = [
        *model.parameters(),
        *model.buffers(),
        *_quant_tensors(model),
        *states,
        *batch.values(),
    ]
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with ctx, tracker:
        tracker.add_all(tensors)
        baseline = tracker.current
        tracker.reset_peak()
        tracker.phase = "loss"
        loss, _, _ = fn(batch)
        tracker.phase = "backward"
        loss.backward()
        del loss
        tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = tracker.current
    step_s = time.perf_counter() - t1
    row = {
        "config": config,
        "mode": mode,
        "layers": layers,
        "seq_per_side": seq,
        "baseline_gib": baseline / GIB,
        "peak_gib": tracker.peak / GIB,
        "peak_above_baseline_gib": (tracker.peak - baseline) / GIB,
        "after_step_gib": after / GIB,
        "peak_at": tracker.peak_at,
        "largest_outputs_mib": {
            k: round(v / MIB, 1)
            for k, v in sorted(tracker.largest.items(), key=lambda kv: -kv[1])[:6]
        },
        "ops": tracker.ops,
        "build_s": build_s,
        "step_s": step_s,
        "impl": impl,
    }
    del model, params, optimizer, fn, tracker, tensors, states, batch
    gc.collect()
    return row


# -- fits ----------------------------------------------------------------------------
def linear_fit(xs, ys) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    res = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    return {"a": a, "b": b, "max_abs_residual": max(abs(r) for r in res)}


def longest_under(points: list[tuple[int, float]], cap: float, step: int):
    """Largest length (multiple of `step`) whose peak, linearly interpolated between
    the measured lengths, stays under `cap`; None if even the first does not fit;
    the last measured length (and 'at_least') if all fit."""
    points = sorted(points)
    if points[0][1] > cap:
        return None, "none_measured_fits"
    for (s0, p0), (s1, p1) in zip(points, points[1:], strict=False):
        if p1 > cap:
            s = s0 + (cap - p0) * (s1 - s0) / (p1 - p0)
            return int(s // step * step), "interpolated"
    return points[-1][0], "at_least"


# -- the run -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[memory_predict] {msg}", file=sys.stderr, flush=True)


def run(settings: dict, quick: bool) -> dict:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    setup = Setup()
    import gpu_check

    report: dict = {
        "benchmark": "memory_predict",
        "label": "PREDICTION from live tensor bytes on the CPU, not a GPU measurement",
        "quick": quick,
        "machine": gpu_check.versions()
        | {
            "python": platform.python_version(),
            "cpu": workload.cpu_name(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": settings,
        "tracker_toy_check": toy_check(),
        "measurements": [],
    }
    rows = report["measurements"]
    model = settings["model"]
    target = settings["target_layers"]

    def do(spec, layers, seq, config, mode, tag):
        row = measure(setup, spec, layers, seq, config, mode)
        row["set"] = tag
        rows.append(row)
        log(
            f"{tag:12s} {config:16s} {mode} L={layers:2d} seq={seq:5d}: peak "
            f"{row['peak_gib']:.3f} GiB (base {row['baseline_gib']:.3f}) at "
            f"{row['peak_at'].get('phase')}/{row['peak_at'].get('op')} "
            f"[{row['build_s']:.1f}+{row['step_s']:.1f}s]"
        )
        return row

    # 1. the fake shortcut against a computed step at the full width
    rc = settings["real_check"]
    check = {}
    for config in CONFIGS:
        real = do(model, rc["layers"], rc["seq"], config, "real", "real_check")
        fake = do(model, rc["layers"], rc["seq"], config, "fake", "real_check")
        check[config] = {
            "real_peak_gib": real["peak_gib"],
            "fake_peak_gib": fake["peak_gib"],
            "rel_diff": (fake["peak_gib"] - real["peak_gib"]) / real["peak_gib"],
        }
    report["fake_vs_real_full_width"] = {"shape": rc, "configs": check}

    # 2. the extrapolation against every depth of a small model (computed)
    small = settings["small"]
    val: dict = {}
    for config in CONFIGS:
        by_mode: dict = {}
        for mode in ("real", "fake"):
            peaks = {
                L: do(small["model"], L, small["seq"], config, mode, "small")[
                    "peak_gib"
                ]
                for L in small["layers"]
            }
            fit_ls = [L for L in small["layers"] if L <= max(settings["fit_layers"])]
            fit = linear_fit(fit_ls, [peaks[L] for L in fit_ls])
            errs = {
                L: (fit["a"] + fit["b"] * L - peaks[L]) / peaks[L]
                for L in small["layers"]
                if L not in fit_ls
            }
            by_mode[mode] = {
                "peaks_gib": peaks,
                "fit_on": fit_ls,
                "fit": fit,
                "extrapolation_rel_error": errs,
            }
        by_mode["fake_vs_real_rel_diff"] = {
            L: (by_mode["fake"]["peaks_gib"][L] - by_mode["real"]["peaks_gib"][L])
            / by_mode["real"]["peaks_gib"][L]
            for L in small["layers"]
        }
        val[config] = by_mode
    report["small_model_validation"] = {"shape": small, "configs": val}

    # 3. the full width at 1, 2, 4 layers, per length (fake), fitted, extrapolated
    pred: dict = {}
    cap = settings["cap_gib"]
    for config in CONFIGS:
        per_len = {}
        for seq in settings["lengths"]:
            ls = settings["fit_layers"]
            peaks = [do(model, L, seq, config, "fake", "full")["peak_gib"] for L in ls]
            fit = linear_fit(ls, peaks)
            per_len[seq] = {
                "peaks_gib": dict(zip(ls, peaks, strict=True)),
                "fit": fit,
                "predicted_peak_gib": fit["a"] + fit["b"] * target,
            }
        points = [(s, v["predicted_peak_gib"]) for s, v in per_len.items()]
        longest, how = longest_under(points, cap, settings["length_step"])
        margin = sum(GPU_MARGIN_GIB.values())
        longest_m, how_m = longest_under(
            [(s, p + margin) for s, p in points], cap, settings["length_step"]
        )
        pred[config] = {
            "per_length": per_len,
            "seq": settings["seq"],
            "predicted_peak_gib": per_len[settings["seq"]]["predicted_peak_gib"],
            "predicted_peak_with_margin_gib": per_len[settings["seq"]][
                "predicted_peak_gib"
            ]
            + margin,
            "longest_under_cap": longest,
            "longest_how": how,
            "longest_under_cap_with_margin": longest_m,
            "longest_with_margin_how": how_m,
        }
    report["prediction"] = {
        "target_layers": target,
        "cap_gib": cap,
        "margin_gib": GPU_MARGIN_GIB,
        "configs": pred,
    }

    # 4. the whole target depth, fake: the extrapolation at the real shape
    if settings["direct_target"]:
        direct = {}
        for config in CONFIGS:
            at = do(model, target, settings["seq"], config, "fake", "direct")
            entry = {
                "seq": settings["seq"],
                "peak_gib": at["peak_gib"],
                "extrapolated_gib": pred[config]["predicted_peak_gib"],
            }
            entry["rel_error"] = (entry["extrapolated_gib"] - at["peak_gib"]) / at[
                "peak_gib"
            ]
            longest = pred[config]["longest_under_cap"]
            if longest:
                at_l = do(model, target, longest, config, "fake", "direct")
                entry["at_longest"] = {"seq": longest, "peak_gib": at_l["peak_gib"]}
            direct[config] = entry
        report["direct_fake_target_depth"] = direct

    report["wall_s"] = time.perf_counter() - t_start
    report["cpu_s"] = time.process_time() - cpu_start
    report["table"] = table(report)
    return report


def table(report: dict) -> str:
    pred = report["prediction"]
    cap = pred["cap_gib"]
    margin = sum(pred["margin_gib"].values())
    direct = report.get("direct_fake_target_depth", {})
    lines = [
        f"PREDICTION (live tensor bytes, {pred['target_layers']} layers extrapolated "
        f"from {report['settings']['fit_layers']}; +{margin:g} GiB margin for the "
        "CUDA context/allocator in the last two columns)",
        f"| config | peak GiB at 2x{report['settings']['seq']} | a GiB | b GiB/layer "
        f"| fit max residual GiB | direct {pred['target_layers']}-layer (fake) GiB "
        f"| longest/side under {cap:g} GiB | peak + margin GiB "
        f"| longest/side with margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt_len(n, how):
        if n is None:
            return "none"
        return f">= {n}" if how == "at_least" else str(n)

    for name in CONFIGS:
        p = pred["configs"][name]
        fit = p["per_length"][p["seq"]]["fit"]
        d = direct.get(name, {}).get("peak_gib")
        lines.append(
            f"| {name} | {p['predicted_peak_gib']:.2f} | {fit['a']:.3f} "
            f"| {fit['b']:.4f} | {fit['max_abs_residual']:.2e} "
            f"| {'' if d is None else format(d, '.2f')} "
            f"| {fmt_len(p['longest_under_cap'], p['longest_how'])} "
            f"| {p['predicted_peak_with_margin_gib']:.2f} "
            f"| {fmt_len(p['longest_under_cap_with_margin'], p['longest_with_margin_how'])} |"  # noqa: E501
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    ap.add_argument(
        "--sharded",
        action="store_true",
        help="per-rank peaks under ZeRO-3 / FSDP2 (memory_sharded.py; "
        "default JSON: results/memory_predict_sharded_cpu.json)",
    )
    ap.add_argument("--out", help="JSON path (default: results/memory_predict_cpu.json")
    args = ap.parse_args(argv)
    if args.sharded:  # its own program: memory_sharded builds on this module
        cmd = [sys.executable, str(HERE / "memory_sharded.py")]
        cmd += ["--quick"] * args.quick + (["--out", args.out] if args.out else [])
        return subprocess.call(cmd)
    settings = SETTINGS["quick" if args.quick else "full"]
    report = run(settings, args.quick)
    out = Path(args.out) if args.out else None
    if out is None and not args.quick:
        out = RESULTS / "memory_predict_cpu.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {out}")
    print(report["table"])
    print(
        f"wall {report['wall_s']:.0f}s, cpu {report['cpu_s']:.0f}s; tracker toy check "
        f"exact: {report['tracker_toy_check']['exact']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
