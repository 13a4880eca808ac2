"""Where the benchmarks record their runs: one JSON per module run under bench/results/, named
<what>-<device>-<time>.json, the commit it measured, the one summary of per-call times they report, and for CPU
runs the processor (model, flags, cache), the kvprec CPU kernel path and a streaming-read bandwidth probe."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def quantiles(times) -> dict:
    """Median and p20 / p80 (linear interpolation) of per-call times given in microseconds."""
    t = torch.tensor(times)
    return {"median_us": t.median().item(), "p20_us": t.quantile(0.2).item(), "p80_us": t.quantile(0.8).item()}


def with_rate(q: dict, nbytes: int, probe_gbps: float) -> dict:
    """:func:`quantiles`' ``q`` of calls that each read ``nbytes``, with bytes, GB/s (bytes / median) and that rate
    as a percentage of a read probe of ``probe_gbps`` (:func:`cpu_read_bandwidth` of the same run and clock)."""
    gbps = nbytes / (q["median_us"] * 1e-6) / 1e9
    return {**q, "bytes": nbytes, "gbps": gbps, "pct_of_probe": 100 * gbps / probe_gbps}


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from ("" outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def write_results(what: str, results: dict, device: str | None = None) -> Path:
    """Write ``results`` as bench/results/<what>-<device>-<YYYYmmdd-HHMMSS>.json (device: the CUDA device's name
    unless given, e.g. cpu_info()["model"]); returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = (device or torch.cuda.get_device_name()).replace(" ", "_").replace("/", "_")
    path = RESULTS_DIR / f"{what}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def cpu_info() -> dict:
    """The processor of a CPU run: model name, the SIMD flags /proc/cpuinfo lists (avx*, fma, f16c, amx*), logical
    CPUs, last-level cache bytes, the kvprec CPU kernel path (kvprec._native.cpu_isa) and torch's own
    (torch.backends.cpu.get_cpu_capability), and the versions."""
    import kvprec
    from kvprec import _native

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
                break
    except OSError:
        pass
    return {"model": model, "flags": flags, "logical_cpus": os.cpu_count(), "llc_bytes": llc_bytes(),
            "kvprec_cpu_isa": _native.cpu_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "kvprec": kvprec.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}


def llc_bytes(default: int = 32 * 2 ** 20) -> int:
    """Bytes of the largest CPU cache (sysfs), or ``default`` where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes, default=default)


def cpu_read_bandwidth(threads: int, nbytes: int | None = None, rounds: int = 7, clock: str = "wall") -> dict:
    """Streaming-read bandwidth of this process on ``threads`` threads: the median time of ``torch.amax`` over a
    uint8 tensor of ``nbytes`` (default 4x the last-level cache, at least 256 MiB): a vectorized max that reads each
    byte once and writes nothing. Returns median / p20 / p80 microseconds, bytes and GB/s (bytes / median).

    clock: "wall" (time.perf_counter) or "thread_cpu" (time.thread_time of the calling thread: only meaningful at
    threads=1, where the max runs in this thread; other processes on a shared machine inflate it far less)."""
    clocks = {"wall": time.perf_counter, "thread_cpu": time.thread_time}
    if clock not in clocks:
        raise ValueError(f"clock={clock!r}: accepted are {sorted(clocks)}")
    if clock == "thread_cpu" and threads != 1:
        raise ValueError(f"clock='thread_cpu' needs threads=1 (got {threads}): other threads' time is not counted")
    now = clocks[clock]
    nbytes = nbytes or max(4 * llc_bytes(), 2 ** 28)
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.amax()
        times = []
        for _ in range(rounds):
            t0 = now()
            x.amax()
            times.append((now() - t0) * 1e6)
    finally:
        torch.set_num_threads(old)
    q = quantiles(times)
    how = "torch.amax over a uint8 tensor" + (", thread CPU time" if clock == "thread_cpu" else "")
    return {**q, "bytes": nbytes, "gbps": nbytes / (q["median_us"] * 1e-6) / 1e9, "threads": threads, "how": how}
