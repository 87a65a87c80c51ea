"""Peak memory of this process, measured the same way by every script that prints a timing summary.

    peak_memory(device)    -> (bytes, kind): on CUDA the allocator's maximum (torch.cuda.max_memory_allocated,
                              kind "cuda_max_allocated": tensors only, since the process started or the last
                              reset_peak_memory_stats); elsewhere the process's peak resident set size
                              (getrusage ru_maxrss, kind "cpu_peak_rss": everything, Python and torch included)
    memory_record(device)  -> {"peak_memory_bytes", "peak_memory_kind", "peak_memory_gib"}: the fields the
                              scripts' JSON records carry
    format_memory(...)     -> "0.93 GiB (cpu_peak_rss)": how the scripts print it (MiB below 0.01 GiB)

Both are the process's peak SO FAR: a script (or benchmark) that measures several things in one process reports,
for each, the largest peak of everything before it too. The device is the one the script resolved from --device.
"""
import resource

import torch

GIB = 2 ** 30


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory(device: torch.device | str | None = None) -> tuple[int, str]:
    """(bytes, kind) of this process's peak memory on `device` so far (see the module's docstring)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"


def record_of(mem: int, kind: str) -> dict:
    """{"peak_memory_bytes": int, "peak_memory_kind": str, "peak_memory_gib": float (3 decimals)}."""
    return {"peak_memory_bytes": mem, "peak_memory_kind": kind, "peak_memory_gib": round(mem / GIB, 3)}


def memory_record(device: torch.device | str | None = None) -> dict:
    """record_of this process's peak memory on `device` so far."""
    return record_of(*peak_memory(device))


def format_memory(record: dict | int, kind: str | None = None) -> str:
    """ "0.93 GiB (cpu_peak_rss)" from a memory_record (or any dict with its fields), or from (bytes, kind)."""
    if isinstance(record, dict):
        record, kind = record["peak_memory_bytes"], record["peak_memory_kind"]
    if record < GIB / 100:  # small CUDA peaks (toy models) would read 0.00 GiB
        return f"{record / 2 ** 20:.1f} MiB ({kind})"
    return f"{record / GIB:.2f} GiB ({kind})"
