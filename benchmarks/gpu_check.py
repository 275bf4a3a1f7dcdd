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
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import workload
from dpo_arms import (
    BETA,
    OneRankAccelerator,
    ours_loss,
    pair_batch,
    stock_loss,
    trl_args,
)
from gpu_check_dpo import _prepare, _train_step, dpo_config, worker_dpo
from gpu_check_logprobs import compare_logprobs, fused_fn, worker_cce, worker_fused
from gpu_check_machine import NEEDED_MODULES, PACKAGES, versions, worker_info
from gpu_check_records import emit
from gpu_check_settings import CONFIGS, PARTS, SETTINGS, TOLERANCE
from workload import REPO

# What other benchmarks and the tests import from here.
__all__ = [
    "BETA",
    "CONFIGS",
    "NEEDED_MODULES",
    "PACKAGES",
    "PARTS",
    "SETTINGS",
    "TOLERANCE",
    "Driver",
    "OneRankAccelerator",
    "_prepare",
    "_train_step",
    "compare_logprobs",
    "dpo_config",
    "emit",
    "fused_fn",
    "main",
    "ours_loss",
    "pair_batch",
    "parse_args",
    "stock_loss",
    "trl_args",
    "versions",
]


def worker_sleep(spec: dict) -> None:
    """For the tests of the time box: one record, then hang."""
    emit("sleep", {"status": "ok"})
    time.sleep(spec.get("seconds", 60))


# The workers the driver starts as `gpu_check.py --worker NAME SPEC`.
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
    """The command line of the driver, and of a worker (--worker NAME SPEC)."""
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
    """One worker when --worker names it; otherwise the whole run."""
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec or "{}"))
        return 0
    return Driver(args).run()


if __name__ == "__main__":
    sys.exit(main())
