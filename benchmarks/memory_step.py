"""One QLoRA DPO step, built real or fake, and its live bytes (memory_predict).

The step is what benchmarks/gpu_check.py runs on the GPU, with its pieces: NF4 base
(bitsandbytes, compute dtype bf16), LoRA r=16 all-linear in bf16, gradient
checkpointing (non-reentrant), bf16 autocast (accelerate), one pair per step; loss,
backward, clip_grad_norm_, AdamW (foreach, as on CUDA). `measure` runs it under
`live_bytes.LiveBytes`, computed on the CPU ("real") or under FakeTensorMode
("fake": shapes, dtypes and storage sizes only).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time

import torch
import workload
from live_bytes import LiveBytes
from workload import GIB, REPO

sys.path.insert(0, str(REPO))

MIB = 2**20


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
