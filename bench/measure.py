"""How the benchmarks measure: a device sync, the process's memory, the peak memory of a block of work, and the
name of the CPU the result files name the machine by.

    with PeakMemory(device) as peak:
        step()
    peak.mb         # MB above what was held before the block: allocated GPU memory, or the CPU resident set

On the CPU the peak is Linux's: the peak resident set counter (VmHWM) is reset to the current resident set at the
start of the block (/proc/self/clear_refs), so it reads the block's own peak. Nothing here touches CUDA unless the
device is a CUDA device (the parent of a GPU benchmark must not initialise CUDA, bench/ranks.py).
"""
from __future__ import annotations

import platform

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_mb() -> dict[str, float]:
    """This process's resident set (VmRSS) and its peak since the last reset (VmHWM), in MB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak_rss() -> None:
    """Linux: the peak resident set (VmHWM) restarts from the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory of a block above what was held before it: allocated GPU memory, or on the CPU the resident set
    (Linux's peak counter reset at the start, /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = status_mb()["VmRSS"]
            reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.before) / 2 ** 20
        else:
            self.mb = status_mb()["VmHWM"] - self.before


def cpu_name() -> str:
    """The CPU's model name and its logical processor count (Linux's /proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x {len(names)} logical"
    except OSError:
        pass
    return cpu
