"""Shared benchmark helpers: timing with warm-up and medians, and a record of the environment."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")


def environment() -> dict:
    """What a figure was measured on: the CPU by name, family/model and the vector flags that pick our
    kernels' path (the same "AMD EPYC" name covers AVX2-only and AVX-512 parts), and the versions."""
    cpu, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
        flags = [flag for flag in _FLAGS if flag in info.get("flags", "").split()]
    except (OSError, KeyError):
        pass
    from .. import kernels

    gpu = torch.cuda.is_available()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cpu_flags": " ".join(flags) or None,
        "kernel_isa": None if gpu else kernels.isa(),  # on a GPU machine the CPU kernels are not built or used
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "cuda": torch.version.cuda if gpu else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def median_seconds(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> tuple[float, list[float]]:
    """Median wall time of `fn` after `warmup` untimed calls; also returns every run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def progress_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", leave=False)
