"""The per-rank arithmetic of memory_sharded.py against 2 real CPU ranks (gloo).

    python benchmarks/memory_ranks.py            # ~2 min on 2 cores
    python benchmarks/memory_ranks.py --out F    # JSON elsewhere

memory_sharded.py PREDICTS a rank's peak as a measured one-process step plus computed
shards (`held / N`) and computed gathered parts (head, one decoder layer). Here a
scaled-down Llama (`SHAPE`, `LAYERS` layers, bf16 base, LoRA r=16 on all linear
layers, gradient checkpointing, one pair of `SEQ` + `SEQ` tokens per rank) trains
one DPO step on 2 processes under each engine, as the users' configs shard it:

    zero3  DeepSpeed ZeRO-3 with yaml_examples/deepspeed/zero3_bf16.json, its
           "auto" values filled as transformers fills them; torch AdamW as the
           client optimizer (what the HF Trainer hands DeepSpeed); reentrant
           checkpointing (TRL forces it for PEFT under ZeRO-3); no autocast
           (accelerate leaves bf16 to DeepSpeed)
    fsdp2  torch `fully_shard`: a unit per decoder layer, the root (embeddings,
           final norm, lm_head) resharded after forward (Axolotl passes
           reshard_after_forward: true to every unit), bf16 parameters in compute
           (MixedPrecisionPolicy), PEFT's fp32 adapters, AdamW, and accelerate's
           bf16 wrap of the forward (autocast, outputs converted to fp32)

Per rank and loss (stock: TRL's own full-logits `DPOTrainer._compute_loss`, called
through gpu_check.stock_loss; prefalign:
core.preference.PreferenceStep) it records, as live tensor bytes (memory_predict's
`LiveBytes`, real tensors): what the rank holds before the step (every tensor alive
after a warm-up step: parameter shards, optimizer states, engine buffers, the
batch), the parameter bytes among them, and the peak during the second step; and
compares them with memory_sharded's `per_rank_held`, `per_rank_gathered` and
`predict` for the same shape and world size, the step measured by `step_fit` (one
process, fake tensors), as the prediction does.

Not a GPU measurement: no CUDA context, allocator or NCCL buffers; gloo's own
buffers live in C++ and are not seen. NF4 is not exercised: both engines train a
bf16 base here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import MethodType

import memory_predict as mp
import memory_sharded as ms
from workload import write_report

SHAPE = {"vocab": 32000, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 688}
LAYERS = 4
SEQ = 256
WORLD = 2
ENGINES = ("zero3", "fsdp2")
CONFIGS = ("stock", "prefalign")
ZERO3_JSON = mp.REPO / "yaml_examples" / "deepspeed" / "zero3_bf16.json"
# TRL's DPOTrainer forces reentrant checkpointing for PEFT under ZeRO-3 (the
# non-reentrant recompute finds the released parameters empty: CheckpointError).
GC_KWARGS = {"zero3": {"use_reentrant": True}, "fsdp2": {"use_reentrant": False}}
TIMEOUT_S = 420


# -- the engines' settings -----------------------------------------------------------
def zero3_config(path: Path, hidden: int, world: int) -> dict:
    """The DeepSpeed JSON with its "auto" values as transformers' HF Trainer fills
    them (HfTrainerDeepSpeedConfig): bucket sizes from the hidden size, one pair
    per rank, max_grad_norm 1.0."""
    config = json.loads(path.read_text())
    filled = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": 1.0,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }
    for dotted, value in filled.items():
        *parents, key = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if node.get(key) == "auto":
            node[key] = value
    auto = [k for k, v in config["zero_optimization"].items() if v == "auto"]
    auto += [k for k, v in config.items() if v == "auto"]
    if auto:
        raise ValueError(f"{path}: 'auto' left unfilled for {auto}")
    config["zero_allow_untested_optimizer"] = True
    return config


# -- the computed side -----------------------------------------------------------------
def computed(spec: dict, layers: int, engine: str, world: int, config: str) -> dict:
    """memory_sharded's per-rank bytes for a bf16 base: the parameter shard (base
    and LoRA parameters), the rest of the held states, and the gathered parts."""
    held = ms.per_rank_held(spec, layers, False, engine, world)
    gathered = ms.per_rank_gathered(spec, layers, False, engine, config)
    lora = ms.model_parts(spec, layers, False, False)["lora_params"]
    # ZeRO-3 keeps the bf16 LoRA parameter, FSDP2 PEFT's fp32 one (TRAINABLE_BYTES).
    lora_param = (2 if engine == "zero3" else 4) * lora / world
    return {
        "params": held["base_shard"] + lora_param,
        "other_states": held["lora_states_shard"] - lora_param,
        "held": sum(held.values()),
        "gathered": sum(gathered.values()),
        "gathered_parts": gathered,
    }


def compare(measured: dict, comp: dict, step_bytes: float, predicted: float) -> dict:
    """Measured vs computed for one rank, in bytes, with relative differences."""
    pairs = {
        "params": (measured["param_bytes"], comp["params"]),
        "held": (measured["baseline_bytes"] - measured["batch_bytes"], comp["held"]),
        "above_held": (
            measured["peak_bytes"] - measured["baseline_bytes"],
            comp["gathered"] + step_bytes,
        ),
        "peak": (measured["peak_bytes"] - measured["batch_bytes"], predicted),
    }
    return {
        name: {"measured": m, "computed": c, "rel": (m - c) / c if c else None}
        for name, (m, c) in pairs.items()
    }


# -- one rank ------------------------------------------------------------------------
def _local(t):
    """The rank's own tensor: a DTensor's local shard, else the tensor."""
    return getattr(t, "_local_tensor", t)


class RankLiveBytes(mp.LiveBytes):
    """LiveBytes that counts a DTensor (FSDP2's sharded parameters, gradients and
    AdamW states) by its local shard, which holds the storage, and follows storages
    resized in place: FSDP2 all-gathers a unit into parameter storages it grows
    (`alloc_storage`) and frees by shrinking them to 0 bytes, no ATen op seen."""

    def add(self, t, op: str = "baseline") -> None:
        t = _local(t)
        if getattr(t, "device", None) is not None and t.device.type != "cpu":
            return  # meta tensors hold no bytes
        super().add(t, op)

    def set_phase(self, name: str) -> None:
        self.phase = name

    def resized(self, storage) -> None:
        """Book a storage's new size (registering it if it was not yet seen)."""
        key, now = storage._cdata, storage.nbytes()
        before = self.live.get(key)
        if before is None:
            weakref.finalize(storage, self._free, key)
        self.live[key] = now
        self.current += now - (before or 0)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = {"op": "storage.resize_", "phase": self.phase}

    def __enter__(self):
        import torch

        original = self._resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            out = original(storage, size)
            self.resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        import torch

        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct CPU storages behind `tensors` (views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        t = _local(t)
        if not hasattr(t, "untyped_storage") or t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def param_tensors(model):
    """Each parameter's tensors on this rank: ZeRO-3's partition (`ds_tensor`) and
    whatever `.data` still holds (persistent small parameters stay whole)."""
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is not None:
            yield part
        if p.numel():
            yield p


def live_tensors(model, optimizer):
    """Every tensor alive on this rank: found by the garbage collector (engine
    buffers, partitions, optimizer states), plus parameters and gradients."""
    import torch

    found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    states = [v for s in getattr(optimizer, "state", {}).values() for v in s.values()]
    return [*found, *param_tensors(model), *grads, *states]


def build_model(engine: str):
    """The bf16 Llama with LoRA r=16 on all linear layers, checkpointing on; PEFT's
    fp32 adapters stay fp32 under FSDP2 (DeepSpeed casts the module to bf16)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from workload import llama_config

    torch.manual_seed(0)
    spec = {**SHAPE, "layers": LAYERS, "seq": SEQ}
    base = AutoModelForCausalLM.from_config(
        llama_config(spec), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    base.requires_grad_(False)
    lora = LoraConfig(
        r=ms.LORA_R,
        lora_alpha=2 * ms.LORA_R,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS[engine])
    model.train()
    return model


def zero3_engine():
    import deepspeed
    import torch

    model = build_model("zero3")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    config = zero3_config(ZERO3_JSON, SHAPE["hidden"], WORLD)
    engine, optimizer, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config
    )
    return engine, optimizer


def fsdp2_model():
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32
    )
    model = build_model("fsdp2")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    # accelerate's prepare_model under bf16 (native amp: every engine but
    # DeepSpeed): the forward autocast, its outputs (the logits) converted to fp32.
    forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(forward), model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    return model, optimizer


class _Unwrap:
    """The one thing gpu_check.ours_loss asks of the accelerator."""

    @staticmethod
    def unwrap_model(model):
        return getattr(model, "module", model)


def loss_fn(engine: str, config: str, model):
    import gpu_check

    if config == "prefalign":
        fn, _ = gpu_check.ours_loss(model, _Unwrap(), packing=False)
        return fn
    args, reason = gpu_check.trl_args(cuda=False, gc_kwargs=GC_KWARGS[engine])
    if args is None:
        raise SystemExit(f"stock runs TRL's own DPO loss; TRL: {reason}")
    fn, _ = gpu_check.stock_loss(model, gpu_check.OneRankAccelerator(), args)
    return fn


def train_step(engine: str, model, optimizer, fn, batch, phase=None) -> None:
    """Loss, backward, clipping and the optimizer step, as each engine runs them;
    `phase(name)` is told where the step is."""
    import torch

    phase = phase or (lambda name: None)
    phase("loss")
    loss, _, _ = fn(batch)
    phase("backward")
    if engine == "zero3":
        model.backward(loss)
        del loss
        phase("optimizer")
        model.step()  # clips (gradient_clipping), steps and zeroes the gradients
        return
    loss.backward()
    del loss
    phase("optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_rank(engine: str, config: str, rank: int) -> dict:
    """A warm-up step (AdamW states exist, as after step 1), then the measured one."""
    import gpu_check
    import torch

    model, optimizer = zero3_engine() if engine == "zero3" else fsdp2_model()
    fn = loss_fn(engine, config, model)
    batch = gpu_check.pair_batch(torch, SEQ, SHAPE["vocab"], "cpu", rank)
    train_step(engine, model, optimizer, fn, batch)
    gc.collect()
    tracker = RankLiveBytes()
    with tracker:
        tracker.add_all(live_tensors(model, optimizer))
        baseline = tracker.current
        tracker.reset_peak()
        train_step(engine, model, optimizer, fn, batch, tracker.set_phase)
    row = {
        "engine": engine,
        "config": config,
        "rank": rank,
        "baseline_bytes": baseline,
        "param_bytes": storage_bytes(param_tensors(model)),
        "batch_bytes": storage_bytes(batch.values()),
        "peak_bytes": tracker.peak,
        "peak_at": tracker.peak_at,
        "largest_outputs_mib": {
            k: round(v / mp.MIB, 2)
            for k, v in sorted(tracker.largest.items(), key=lambda kv: -kv[1])[:6]
        },
    }
    del model, optimizer, fn, tracker
    gc.collect()
    return row


def worker(engine: str, config: str, rank: int, port: int, out: Path) -> None:
    """Rank `rank` of WORLD: one config under one engine (a process of its own, so
    that nothing of another run is alive), its row to OUT."""
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    if engine == "zero3":
        import deepspeed

        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (g++, about
        # 2 min) when it starts; gloo does every collective without it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    row = measure_rank(engine, config, rank)
    (out / f"{engine}-{config}-{rank}.json").write_text(json.dumps(row, indent=2))
    torch.distributed.destroy_process_group()


# -- the driver ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, config: str, out: Path) -> list[dict]:
    """Both ranks of one run; their rows, or an error with both logs' tails."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(mp.REPO), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    name = f"{engine}-{config}"
    logs = [out / f"{name}-{r}.log" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", name, str(r), port, str(out)],
            stdout=logs[r].open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(WORLD)
    ]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        codes = ["timeout"] * WORLD
    if any(codes):
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
        raise RuntimeError(f"{name}: ranks ended {codes}\n{tails}")
    return [json.loads((out / f"{name}-{r}.json").read_text()) for r in range(WORLD)]


def one_process_steps() -> dict:
    """memory_sharded.step_fit at this shape: the step above its baseline, per
    config, fitted over 1 and 2 layers and evaluated at LAYERS (fake tensors)."""
    import torch

    torch.set_num_threads(1)
    setup = mp.Setup()
    scenario = {"model": SHAPE, "layers": LAYERS, "nf4": False}
    settings = {"fit_layers": [1, 2], "lengths": [SEQ]}
    rows: list = []
    steps = {c: ms.step_fit(setup, settings, scenario, c, rows) for c in CONFIGS}
    return {"steps": steps, "measurements": rows}


def assemble(rows: list[dict], steps: dict) -> list[dict]:
    """Each rank's row with the computed side and the differences."""
    out = []
    for row in rows:
        engine, config = row["engine"], row["config"]
        scenario = {"model": SHAPE, "layers": LAYERS, "nf4": False, "engine": engine}
        step = steps[config]
        predicted = ms.predict(
            scenario, step, WORLD, 1e9, {"seq": SEQ, "length_step": 8}, config
        )["peak_gib"]
        comp = computed(SHAPE, LAYERS, engine, WORLD, config)
        step_bytes = step[SEQ]["at_target_gib"] * mp.GIB
        row = {**row, "computed": comp, "one_process_step_bytes": step_bytes}
        row["compare"] = compare(row, comp, step_bytes, predicted * mp.GIB)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    """Measured vs computed per rank, in MiB, the relative difference, and where
    the measured peak is (phase/op)."""
    cols = ("params", "held", "above_held", "peak")
    head = " | ".join(f"{c} meas / comp MiB (diff)" for c in cols)
    lines = [
        f"| engine | config | rank | {head} | peak at |",
        "|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for row in rows:
        cells = []
        for c in cols:
            v = row["compare"][c]
            rel = "" if v["rel"] is None else f" ({v['rel']:+.0%})"
            m, c = v["measured"] / mp.MIB, v["computed"] / mp.MIB
            cells.append(f"{m:.1f} / {c:.1f}{rel}")
        at = row.get("peak_at", {})
        cells.append(f"{at.get('phase')}/{at.get('op')}")
        lines.append(
            f"| {row['engine']} | {row['config']} | {row['rank']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", help="JSON (default results/memory_sharded_ranks_cpu.json)"
    )
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument(
        "--worker", nargs=4, metavar=("ENGINE-CONFIG", "RANK", "PORT", "DIR")
    )
    args = ap.parse_args(argv)
    if args.worker:
        name, rank, port, out = args.worker
        engine, config = name.split("-")
        worker(engine, config, int(rank), int(port), Path(out))
        return 0
    import tempfile

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory_ranks_") as tmp:
        for engine in args.engines.split(","):
            for config in CONFIGS:
                mp.log(f"{engine} {config}: {WORLD} ranks")
                rows += launch(engine, config, Path(tmp))
    one = one_process_steps()
    ranked = assemble(rows, one["steps"])
    report = {
        "benchmark": "memory_ranks",
        "label": "live tensor bytes per rank of 2 gloo CPU processes against "
        "memory_sharded's per-rank arithmetic; not a GPU measurement",
        "shape": {**SHAPE, "layers": LAYERS, "seq_per_side": SEQ, "world": WORLD},
        "zero3_config": zero3_config(ZERO3_JSON, SHAPE["hidden"], WORLD),
        "one_process": one,
        "ranks": ranked,
        "wall_s": time.perf_counter() - t0,
    }
    report["table"] = table(ranked)
    path = Path(args.out) if args.out else mp.RESULTS / "memory_sharded_ranks_cpu.json"
    mp.log(f"wrote {write_report(path, report)}")
    print(report["table"])
    print(f"wall {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
