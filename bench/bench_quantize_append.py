"""quantize_append on a 16k-token prefill (B=1, Hkv=8, D=128, T=64) per backend, against a copy of the same input
bytes measured in the same run, on the CPU and (where present) CUDA.

CPU (always): ``python -m pytest bench/bench_quantize_append.py -q -k cpu``. The input is what the buffer's seal
hands over, x [B, Hkv, NB, T, D] FP32 (the CPU model dtype; 64 MiB, twice a 32 MiB last-level cache, so each call
reads it from memory), pages [B, Hkv, NB] in a random order; backends "cpp" (the C++ kernel) and "torch" (the
reference), INT8 / INT4 / INT2, keys and values, 1 and 2 threads. The call and ``dst.copy_(x)`` are timed in turn,
round after round (time.perf_counter). Per case, in ``benchmark.extra_info`` and one JSON under bench/results/
(bench/results_file.py: CPU model and flags, kvprec CPU path, versions, the streaming-read probe per thread count):
median and p20/p80 in microseconds, bytes (input read + pages read + codes and FP16 scale / zero written), GB/s,
% of the probe, and the copy's median over ours.

CUDA (skipped without a GPU): ``python -m pytest bench/bench_quantize_append.py -q -k cuda``. The input is FP16,
device-held pages in a random order, one pool per input set; ``check=False``, so nothing synchronises inside the
timed call. Times are CUDA events around one eager call (launcher host work included), over input sets rotated so
that the L2 (50 MB on an H100) never holds the next call's input (cold L2), with the helpers of
bench_decode_attention.py. Per case, recorded in ``benchmark.extra_info`` and in one JSON file under
bench/results/: median and p20/p80 in microseconds; bytes = input read + pages index read + packed codes and
FP16 scale/zero written; effective GB/s = bytes / median; the copy's GB/s = 2 * input bytes / its median
(read + write of the same bytes); % of copy = ours / copy.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import kvprec
from kvprec import ops
from kvprec.storage.formats import Tier

from bench_decode_attention import L2_BYTES, _event_times, _interleaved, needs_cuda
from results_file import cpu_info, cpu_read_bandwidth, git_commit, quantiles, write_results

B, HKV, D, L, T, G = 1, 8, 128, 16384, 64, 32
NB = L // T
ROUNDS, WARMUP = 50, 5
TIERS = {"int4": Tier.INT4, "int8": Tier.INT8}
BACKENDS = [b for b in ("cuda", "triton", "torch") if torch.cuda.is_available() and
            ops._why_unavailable(ops.REGISTRY["quantize_append"], b, torch.device("cuda")) is None]
_RESULTS: dict = {"cases": []}


def _input_bytes() -> int:
    return B * HKV * L * D * 2


def _written_bytes(tier: Tier, keys: bool) -> int:
    n = B * HKV * NB
    meta = D if keys else T * (D // G)
    return n * (T * D * tier.bits // 8 + 2 * 2 * meta)


def _make_sets(tier: Tier, keys: bool):
    """Input sets (x, pages, codes, scale, zero, amax), enough that their inputs span twice the L2."""
    sets = []
    n_sets = max(2, -(-2 * L2_BYTES // _input_bytes()))
    for seed in range(n_sets):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16, generator=gen).unflatten(2, (NB, T))
        p = B * HKV * NB
        pages = torch.randperm(p, device="cuda", generator=gen).reshape(B, HKV, NB)
        meta = (p, D) if keys else (p, T, D // G)
        codes = torch.empty(p, T, D * tier.bits // 8, dtype=torch.uint8, device="cuda")
        scale = torch.empty(meta, dtype=torch.float16, device="cuda")
        zero = torch.empty(meta, dtype=torch.float16, device="cuda")
        sets.append((x, pages, codes, scale, zero, torch.zeros(1, device="cuda")))
    return sets


@pytest.fixture(scope="module")
def copy_times():
    """Device-to-device copies of the same input bytes (cold L2: rotated sources), in this run; one record."""
    n_sets = max(2, -(-2 * L2_BYTES // _input_bytes()))
    srcs = [torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16) for _ in range(n_sets)]
    dst = torch.empty_like(srcs[0])
    q = quantiles(_event_times(lambda s: dst.copy_(s), srcs, ROUNDS, WARMUP))
    gbps = 2 * _input_bytes() / (q["median_us"] * 1e-6) / 1e9
    del srcs, dst
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    import triton

    _RESULTS.update({
        "device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "kvprec": kvprec.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "shape": {"B": B, "Hkv": HKV, "D": D, "L": L, "T": T, "G": G}, "input_dtype": "float16", "rounds": ROUNDS,
        "copy": {**q, "bytes": 2 * _input_bytes(), "gbps": gbps},
    })
    yield gbps
    write_results("quantize_append", _RESULTS)


@needs_cuda
@pytest.mark.parametrize("keys", [True, False], ids=["keys", "values"])
@pytest.mark.parametrize("tier", list(TIERS), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_quantize_append(benchmark, copy_times, backend, tier, keys):
    tr = TIERS[tier]
    sets = _make_sets(tr, keys)

    def call(s):
        x, pages, codes, scale, zero, amax = s
        ops.quantize_append(x, tr, pages, codes, scale, zero, keys=keys, group_size=G, amax=amax, check=False,
                            backend=backend)

    # correctness guard: the timed backend writes what the reference writes, bit for bit, on the first set
    x, pages, codes, scale, zero, _ = sets[0]
    ref = [torch.empty_like(a) for a in (codes, scale, zero)]
    ops.quantize_append(x, tr, pages, *ref, keys=keys, group_size=G, backend="torch")
    call(sets[0])
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip((codes, scale, zero), ref))

    times = _event_times(call, sets, ROUNDS, WARMUP)
    counter = iter(range(10 ** 9))

    def timed():  # what pytest-benchmark times: one synchronized call on the next input set
        call(sets[next(counter) % len(sets)])
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    q = quantiles(times)
    nbytes = _input_bytes() + pages.numel() * pages.element_size() + _written_bytes(tr, keys)
    gbps = nbytes / (q["median_us"] * 1e-6) / 1e9
    info = {"backend": backend, "tier": tier, "kind": "keys" if keys else "values", "input_sets": len(sets), **q,
            "bytes": nbytes, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_times,
            "copy_median_us": _RESULTS["copy"]["median_us"]}
    benchmark.extra_info.update(info)
    _RESULTS["cases"].append(info)
    del sets
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# CPU

CPU_TIERS = {"int8": Tier.INT8, "int4": Tier.INT4, "int2": Tier.INT2}
CPU_BACKENDS = ["cpp", "torch"]
CPU_THREADS = [1, 2]
CPU_ROUNDS = int(os.environ.get("KVPREC_BENCH_ROUNDS", "9"))
_CPU: dict = {"cases": []}


@pytest.fixture(scope="module")
def cpu_input():
    """x [B, Hkv, NB, T, D] FP32 (a view of [B, Hkv, L, D]), its copy target, random pages; the run's processor and
    streaming-read probe; writes the JSON at the end."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, HKV, L, D, generator=gen).unflatten(2, (NB, T))
    pages = torch.randperm(B * HKV * NB, generator=gen).reshape(B, HKV, NB)
    _CPU.update(cpu_info())
    _CPU["probe"] = {str(t): cpu_read_bandwidth(t) for t in CPU_THREADS}
    _CPU.update({"shape": {"B": B, "Hkv": HKV, "D": D, "L": L, "T": T, "G": G}, "input_dtype": "float32",
                 "rounds": CPU_ROUNDS})
    yield x, torch.empty_like(x), pages
    write_results("quantize_append-cpu", _CPU, device=_CPU["model"])


@pytest.mark.parametrize("threads", CPU_THREADS)
@pytest.mark.parametrize("keys", [True, False], ids=["keys", "values"])
@pytest.mark.parametrize("tier", list(CPU_TIERS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_quantize_append(benchmark, cpu_input, backend, tier, keys, threads):
    x, dst, pages = cpu_input
    tr = CPU_TIERS[tier]
    p = B * HKV * NB
    meta = (p, D) if keys else (p, T, D // G)
    pool = [torch.empty(p, T, D * tr.bits // 8, dtype=torch.uint8), torch.empty(meta, dtype=torch.float16),
            torch.empty(meta, dtype=torch.float16)]

    def call():
        ops.quantize_append(x, tr, pages, *pool, keys=keys, group_size=G, check=False, backend=backend)

    # correctness guard: what the reference writes, bit for bit
    ref = [torch.empty_like(a) for a in pool]
    ops.quantize_append(x, tr, pages, *ref, keys=keys, group_size=G, backend="torch")
    call()
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(pool, ref))

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours_t, copy_t = _interleaved([call, lambda: dst.copy_(x)], CPU_ROUNDS)
        benchmark.pedantic(call, rounds=max(3, CPU_ROUNDS // 2), iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
    q, c = quantiles(ours_t), quantiles(copy_t)
    nbytes = x.numel() * 4 + pages.numel() * pages.element_size() + _written_bytes(tr, keys)
    gbps = nbytes / (q["median_us"] * 1e-6) / 1e9
    probe = _CPU["probe"][str(threads)]["gbps"]
    info = {"backend": backend, "tier": tier, "kind": "keys" if keys else "values", "threads": threads,
            "isa": kvprec._native.cpu_isa(), **q, "bytes": nbytes, "gbps": gbps, "pct_of_probe": 100 * gbps / probe,
            "copy": {**c, "bytes": 2 * x.numel() * 4}, "copy_median_over_ours": c["median_us"] / q["median_us"]}
    benchmark.extra_info.update(info)
    _CPU["cases"].append(info)
