"""Part 0 of gpu_check.py: the machine. The carried wheels installed, nvidia-smi,
and a worker that records the versions, what imports and the device."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import workload
from gpu_check_records import emit

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


def versions() -> dict:
    """The installed version of each package the run reports (None: missing)."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def worker_info(spec: dict) -> None:
    """Part 0's worker: versions, what imports, and the device it sees."""
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


def install_wheels(wheel_dir: str, site: Path, timeout: float) -> dict:
    """The carried wheels into `site` (pip --target), unzipped if pip fails."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    out: dict = {
        "wheel_dir": str(wheel_dir),
        "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in wheels],
        "site_dir": str(site),
    }
    if not wheels:
        out["install"] = "none: no wheels (run benchmarks/gpu_wheels.sh .whl here)"
        return out
    site.mkdir(parents=True, exist_ok=True)
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
        str(site),
        *map(str, wheels),
    ]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
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
            zf.extractall(site)
    out["install"] = "unzipped (pip failed)"
    return out


def nvidia_smi() -> dict:
    """The GPU's name, memory, driver, clock and power limit, and the full table."""
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
