"""Part 0 of gpu_check.py: the machine. A worker that records the versions, what
imports and the device."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

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
