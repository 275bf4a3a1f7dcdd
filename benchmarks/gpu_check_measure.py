"""Time and memory as gpu_check.py's workers measure them, on CUDA or the CPU."""

from __future__ import annotations

from workload import GIB


def sync(torch, cuda: bool) -> None:
    """Wait for queued CUDA work, so that a timer sees it."""
    if cuda:
        torch.cuda.synchronize()


def peak_gib(torch, cuda: bool) -> float:
    """CUDA: max allocated since the last reset. CPU (dry run): the process's max
    resident set so far, a stand-in that is positive but not per step."""
    if cuda:
        return torch.cuda.max_memory_allocated() / GIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def is_oom(torch, exc: BaseException) -> bool:
    """Whether an exception is the device running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
