"""gpu_check.py's driver: runs each part in its own time-boxed worker subprocess
within the whole run's budget, and rewrites the JSON after every part, so that a
failing, hanging or killed part never loses what the others measured."""

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
from pathlib import Path

import gpu_check_report as report
import workload
from gpu_check_machine import install_wheels, nvidia_smi
from gpu_check_records import read_records, without_kind
from gpu_check_settings import CONFIGS, SETTINGS, TOLERANCE
from workload import REPO

# The script each worker runs: `gpu_check.py --worker NAME SPEC`.
ENTRY = Path(__file__).with_name("gpu_check.py")


class Driver:
    """One run: the parts in order, each recorded in $OUT/gpu_check.json."""

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
        cmd = [sys.executable, str(ENTRY), "--worker", name, json.dumps(spec)]
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
        records = read_records(stdout or "")
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
            timeout = min(self.settings["budget"]["setup"] * 0.6, self.left())
            out.update(install_wheels(self.args.wheels, self.site, timeout))
        out["nvidia_smi"] = nvidia_smi()
        info = self.worker("info", {}, self.settings["budget"]["setup"] / 2)
        got = [r for r in info["records"] if r["kind"] == "info"]
        if got:
            device = without_kind(got[-1])
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

    # -- part 1 --
    def fused(self) -> dict:
        run = self.worker(
            "fused_vs_plain",
            self.spec(),
            self.settings["budget"]["fused_vs_plain"],
        )
        return self.single(run, "fused_vs_plain")

    def single(self, run: dict, kind: str) -> dict:
        """A one-record part: its record, or the worker's failure."""
        got = [r for r in run["records"] if r["kind"] == kind]
        if got:
            return without_kind(got[-1])
        return {
            "status": run["status"] if run["status"] != "ok" else "error",
            "error": run["stderr_tail"],
        }

    def spec(self, **extra) -> dict:
        """What a worker is told: this run's settings and `extra`."""
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
                    rows[r["config"]] = without_kind(r)
                    if r.get("worker_s"):
                        main_s = max(main_s if i else 0.0, r["worker_s"] / k)
                elif r["kind"] == "max_length":
                    searches[r["config"]] = without_kind(r)
            _fill_missing(group, run, rows, searches)
            self.report["parts"]["dpo_step"] = report.dpo_summary(
                rows,
                time.time() - t0,
                self.report["device"].get("peak_bf16_tflops"),
                self.settings["model"],
            )
            self.report["parts"]["max_length"] = report.search_summary(
                searches, self.settings["cap_gib"]
            )
            self.write()
        self.log(
            "part dpo_step: " + ", ".join(f"{k} {v['status']}" for k, v in rows.items())
        )

    # -- part 4 --
    def cce(self) -> dict:
        run = self.worker("cce", self.spec(), self.settings["budget"]["cce"])
        return self.single(run, "cce")

    # -- all --
    def table(self) -> str:
        return report.table(self.report["parts"], self.settings["cap_gib"])

    def run(self) -> int:
        """Every part in order; exit 0 if each is ok or skipped, else 3."""
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


def _fill_missing(group: list, run: dict, rows: dict, searches: dict) -> None:
    """The rows a worker never wrote: its failure, and the search it never ran."""
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
