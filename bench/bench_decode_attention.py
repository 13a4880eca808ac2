"""Decode attention over a mixed-precision paged cache against torch SDPA, on the CPU and (where present) CUDA.

CPU (always): ``python -m pytest bench/bench_decode_attention.py -q -k cpu`` (``KVPREC_BENCH_SMOKE=1``: small shapes,
to check the harness). One decode step (Q = 1) of ``MixedPrecisionBuffer.attend`` per tier (FP32 / FP16 / BF16 /
INT8 / INT4 / INT2, every block at that tier, FP32 model dtype) at (B, Hq, Hkv, D, N) = (1, 32, 8, 128, 16384) and
(8, 32, 8, 128, 4096), on 1 and 2 threads (torch.set_num_threads; the kvprec kernels run on ATen's pool), against
``scaled_dot_product_attention(enable_gqa=True)`` on FP32 and on BF16 K/V in the same test: the three calls are
timed in turn, round after round (time.perf_counter around each call), so that a machine shared with other work
slows them alike; each rotates over input sets that together exceed twice the last-level cache (a decode step
that reads every layer's cache finds none of it cached). pytest-benchmark times the kvprec call on its own as well.
Per case, in ``benchmark.extra_info`` and one JSON under bench/results/ (bench/results_file.py: CPU model and flags,
kvprec CPU path, versions): median and p20/p80 in microseconds, bytes read (the pages the block table uses:
BlockGeometry.page_bytes, the block table, q and out; SDPA: K, V, q and out), effective GB/s, % of a
streaming-read probe at the same thread count measured at the start of the run, and SDPA FP32 / BF16 median over
ours. 1-thread cases also record the same calls in the calling thread's CPU time (``thread_cpu``: medians, GB/s,
% of the probe timed the same way, SDPA ratios), which other processes on a shared machine inflate far less than
wall-clock time. The run's summary adds the 2-thread over 1-thread speed per tier, the batch-8 ratios over the
batch-1 ones, and each target of the CPU decode work with its measured value (``targets``; the 1-thread ones in
thread CPU time under ``targets_thread_cpu``).

CUDA (skipped without a GPU): ``python -m pytest bench/bench_decode_attention.py -q -k cuda``. Each case
times one decode step (Q = 1) with CUDA events around the call, over input sets rotated so that the L2 (50 MB
on an H100) never holds the next call's K/V (cold L2, as a decode step that reads every layer's cache sees it).
Figures go to ``benchmark.extra_info`` and, at the end of the module, to one JSON file under bench/results/ with
the device, versions, shapes and, per case: median and p20/p80 in microseconds, bytes read, effective GB/s,
% of the device-to-device copy bandwidth measured in the same run, and SDPA's median / ours. Where the CUDA
kernels are built (kvprec.cuda_kernels_available()), each case also times the CUDA kernel on the same input sets
and records it under "cuda" (with its speedup over Triton); pytest-benchmark's own timing stays on Triton.

Timings are of eager calls: they include the launcher's host work (input checks, two Triton launches with ~70
arguments; for CUDA the op's checks and two launches) whenever the GPU would otherwise wait for it; no CUDA graph
hides it. Bytes read = the pages the block table uses (K and V data plus FP16 scales and zeros:
BlockGeometry.page_bytes) + the tail + the block table + q and out; SDPA reads FP16 K/V + q + out. Mixed
"10/30/60" is 10% FP16, 30% INT8 and 60% INT4 blocks, drawn at random per (b, head, block).
"""
from __future__ import annotations

import math
import os
import platform
import time

import pytest
import torch

import kvprec
from kvprec import ops
from kvprec.storage.formats import BlockGeometry, Tier
from kvprec.ops.reference import PagedKV
from results_file import cpu_info, cpu_read_bandwidth, git_commit, quantiles, with_rate, write_results

HAS_CUDA = torch.cuda.is_available()
try:
    import triton
    from kvprec.ops.triton import decode_attention as tda
except ImportError:  # the CPU cases need neither
    triton = tda = None
needs_cuda = pytest.mark.skipif(not HAS_CUDA or triton is None, reason="the CUDA cases need a CUDA device and triton")

SHAPES = [  # B, Hq, Hkv, D, N
    (1, 32, 8, 128, 16384),
    (16, 32, 8, 128, 16384),
    (8, 32, 8, 128, 65536),
    (64, 32, 8, 128, 4096),
]
TIERS = {"fp16": Tier.FP16, "int8": Tier.INT8, "int4": Tier.INT4, "int2": Tier.INT2,
         "mixed-10-30-60": ((Tier.FP16, 0.1), (Tier.INT8, 0.3), (Tier.INT4, 0.6))}
BLOCK_SIZE, GROUP_SIZE = 64, 32
L2_BYTES = 50 * 2 ** 20
ROUNDS, WARMUP = 50, 5
MAX_SETS = 16
_RESULTS: dict = {"cases": []}
CUDA_KERNELS = HAS_CUDA and kvprec.cuda_kernels_available()


def _tier_map(b, hkv, nb, tiers, gen):
    if isinstance(tiers, Tier):
        return torch.full((b, hkv, nb), int(tiers), dtype=torch.int8)
    ids = torch.tensor([int(t) for t, _ in tiers])
    probs = torch.tensor([p for _, p in tiers])
    return ids[torch.multinomial(probs, b * hkv * nb, replacement=True, generator=gen)].reshape(b, hkv, nb).to(
        torch.int8)


def _paged_bytes(paged: PagedKV) -> int:
    geo = BlockGeometry(paged.block_size, paged.head_dim, paged.group_size)
    counts = torch.bincount(paged.tiers.flatten().long().cpu(), minlength=len(Tier)).tolist()
    pages = sum(n * geo.page_bytes(Tier(t)) for t, n in enumerate(counts))
    tail = 2 * paged.tail_k.numel() * paged.tail_k.element_size()
    return pages + tail + paged.tiers.numel() * 5


def _make_set(b, hkv, n, d, tiers, seed):
    """One input set: a PagedKV at ``tiers`` and the FP16 K/V SDPA reads, from the same random K/V."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, generator=gen)
    tier_map = _tier_map(b, hkv, n // BLOCK_SIZE, tiers, torch.Generator().manual_seed(seed))
    paged = PagedKV.from_dense(k, v, tier_map, BLOCK_SIZE, GROUP_SIZE, spare_pages=0,
                               generator=torch.Generator().manual_seed(seed))
    return paged, k, v


def _event_times(fn, sets, rounds, warmup):
    """Per-call times (us) with CUDA events, rotating over ``sets`` (one set per call)."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s = sets[i % len(sets)]
        start.record()
        fn(s)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy of 1 GiB: 2 GiB moved (read + write) per copy; median over 20 copies."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = _event_times(lambda _: dst.copy_(src), [None], 20, 3)
    gbps = 2 * src.numel() / (quantiles(times)["median_us"] * 1e-6) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    _RESULTS.update({
        "device": props.name, "sm_count": props.multi_processor_count,
        "copy_gbps": gbps, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "kvprec": kvprec.__version__, "python": platform.python_version(),
        "git_commit": git_commit(),
        "block_size": BLOCK_SIZE, "group_size": GROUP_SIZE, "rounds": ROUNDS,
        "backend": ops.resolve_backend("decode_attention", "auto", torch.device("cuda")),
        "cuda_kernels": CUDA_KERNELS,
    })
    yield gbps
    write_results("decode_attention", _RESULTS)


@needs_cuda
@pytest.mark.parametrize("tiers", list(TIERS), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-hq{}-hkv{}-d{}-n{}".format(*s))
def test_cuda_decode_attention(benchmark, copy_bandwidth, shape, tiers):
    b, hq, hkv, d, n = shape
    one_set = 2 * b * hkv * n * d * 2  # FP16 K/V of one set: what SDPA reads, and an upper bound on ours
    free = torch.cuda.mem_get_info()[0]
    if 4 * one_set > 0.8 * free:  # FP16 K/V + pools + FP32 quantization temporaries of one set
        pytest.skip(f"one input set needs about {4 * one_set / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    sets, paged_total = [], 0
    while paged_total < 2 * L2_BYTES and len(sets) < MAX_SETS:  # cold L2 for the smaller (quantized) reads
        paged, k, v = _make_set(b, hkv, n, d, TIERS[tiers], seed=len(sets))
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
        sets.append((q, paged, k, v))
        paged_total += _paged_bytes(paged)
    n_sets = len(sets)

    def ours(s):
        return tda.decode_attention(s[0], s[1])

    def sdpa(s):
        return torch.nn.functional.scaled_dot_product_attention(s[0], s[2], s[3], enable_gqa=True)

    def ours_cuda(s):
        return ops.decode_attention(s[0], s[1], backend="cuda")

    # correctness guard: the timed kernel must agree with SDPA on the dequantized K/V of the first set
    q, paged, _, _ = sets[0]
    if b * hkv * n <= 8 * 8 * 16384:
        k_deq, v_deq = paged.dense(torch.float16)
        want = torch.nn.functional.scaled_dot_product_attention(q, k_deq, v_deq, enable_gqa=True)
        torch.testing.assert_close(ours(sets[0])[0], want, atol=2e-3, rtol=2e-2)
        if CUDA_KERNELS:
            torch.testing.assert_close(ours_cuda(sets[0])[0], want, atol=2e-3, rtol=2e-2)
        del k_deq, v_deq

    ours_t = _event_times(ours, sets, ROUNDS, WARMUP)
    sdpa_t = _event_times(sdpa, sets, ROUNDS, WARMUP)
    cuda_t = _event_times(ours_cuda, sets, ROUNDS, WARMUP) if CUDA_KERNELS else None
    counter = iter(range(10 ** 9))

    def timed():  # what pytest-benchmark times: one synchronized call on the next input set
        ours(sets[next(counter) % n_sets])
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)

    io = 2 * q.numel() * q.element_size()
    bytes_ours = _paged_bytes(paged) + io
    bytes_sdpa = one_set + io
    ours_q, sdpa_q = quantiles(ours_t), quantiles(sdpa_t)
    gbps = bytes_ours / (ours_q["median_us"] * 1e-6) / 1e9
    info = {
        "shape": dict(zip(("B", "Hq", "Hkv", "D", "N"), shape)), "tiers": tiers, "input_sets": n_sets,
        **ours_q, "bytes": bytes_ours, "gbps": gbps, "pct_of_copy": 100 * gbps / copy_bandwidth,
        "splits": tda.choose_num_splits(b * hkv, math.ceil(n / BLOCK_SIZE), torch.device("cuda")),
        "sdpa": {**sdpa_q, "bytes": bytes_sdpa,
                 "gbps": bytes_sdpa / (sdpa_q["median_us"] * 1e-6) / 1e9},
        "speedup_vs_sdpa": sdpa_q["median_us"] / ours_q["median_us"],
    }
    if cuda_t is not None:
        cuda_q = quantiles(cuda_t)
        cuda_gbps = bytes_ours / (cuda_q["median_us"] * 1e-6) / 1e9
        info["cuda"] = {**cuda_q, "bytes": bytes_ours, "gbps": cuda_gbps,
                        "pct_of_copy": 100 * cuda_gbps / copy_bandwidth,
                        "speedup_vs_sdpa": sdpa_q["median_us"] / cuda_q["median_us"],
                        "speedup_vs_triton": ours_q["median_us"] / cuda_q["median_us"]}
    benchmark.extra_info.update(info)
    _RESULTS["cases"].append(info)
    del sets
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# CPU

SMOKE = os.environ.get("KVPREC_BENCH_SMOKE") == "1"
CPU_SHAPES = [(1, 8, 2, 64, 2048), (2, 8, 2, 64, 1024)] if SMOKE else [(1, 32, 8, 128, 16384), (8, 32, 8, 128, 4096)]
CPU_TIERS = ["fp32", "fp16", "bf16", "int8", "int4", "int2"]
CPU_THREADS = [1, 2]
CPU_ROUNDS = int(os.environ.get("KVPREC_BENCH_ROUNDS", "3" if SMOKE else "9"))
CPU_MAX_SETS = 8
# Targets of the CPU decode work (1 thread unless said): SDPA median / ours at batch 1.
CPU_TARGETS = {"int4": {"sdpa_bf16": 4.0, "sdpa_fp32": 8.0, "pct_of_probe": 50.0}, "int8": {"sdpa_bf16": 2.5},
               "int2": {"sdpa_bf16": 5.0}, "fp16": {"sdpa_bf16": 1.2}, "bf16": {"sdpa_bf16": 1.2}}
_CPU: dict = {"cases": []}
_CPU_INPUTS: dict = {}


def _shape_id(s):
    return "b{}-hq{}-hkv{}-d{}-n{}".format(*s)


@pytest.fixture(scope="module")
def cpu_run():
    """The run's processor, kvprec CPU path and streaming-read probe per thread count; writes the JSON at the end."""
    _CPU.update(cpu_info())
    _CPU["probe"] = {str(t): cpu_read_bandwidth(t) for t in CPU_THREADS}
    _CPU["probe_thread_cpu"] = cpu_read_bandwidth(1, clock="thread_cpu")
    _CPU.update({"block_size": BLOCK_SIZE, "model_dtype": "float32", "rounds": CPU_ROUNDS, "smoke": SMOKE})
    yield _CPU
    _CPU["summary"] = _cpu_summary(_CPU["cases"])
    _CPU_INPUTS.clear()
    write_results("decode_attention-cpu", _CPU, device=_CPU["model"])


def _cpu_inputs(shape):
    """K, V, q (FP32) of a shape, their BF16 copies, and the kvprec buffers per tier (built on first use, enough
    copies that one tier's copies exceed twice the last-level cache); one shape held at a time."""
    if _CPU_INPUTS.get("shape") != shape:
        _CPU_INPUTS.clear()
        b, hq, hkv, d, n = shape
        gen = torch.Generator().manual_seed(0)
        k, v = (torch.randn(b, hkv, n, d, generator=gen) for _ in range(2))
        q = torch.randn(b, hq, 1, d, generator=gen)
        _CPU_INPUTS.update(shape=shape, k=k, v=v, q=q, k16=k.bfloat16(), v16=v.bfloat16(), q16=q.bfloat16(), bufs={})
    return _CPU_INPUTS


def _cpu_buffers(inputs, tier):
    if tier not in inputs["bufs"]:
        b, hq, hkv, d, n = inputs["shape"]
        sets = []
        while True:
            buf = kvprec.MixedPrecisionBuffer(b, hkv, d, BLOCK_SIZE, dtype=torch.float32, default_tier=tier)
            buf.append(inputs["k"], inputs["v"])
            sets.append(buf)
            mem = buf.memory()
            if len(sets) * mem.resident_bytes >= 2 * _CPU["llc_bytes"] or len(sets) >= CPU_MAX_SETS:
                break
        inputs["bufs"][tier] = sets
    return inputs["bufs"][tier]


def _interleaved(fns, rounds):
    """Per-call microseconds of each fn, timed in turn round after round (one warm-up call each first): wall-clock
    times and the calling thread's CPU times (time.thread_time), each a list per fn."""
    for f in fns:
        f()
    times, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(rounds):
        for f, t, c in zip(fns, times, cpu):
            t0, c0 = time.perf_counter(), time.thread_time()
            f()
            c.append((time.thread_time() - c0) * 1e6)
            t.append((time.perf_counter() - t0) * 1e6)
    return times, cpu


@pytest.mark.parametrize("threads", CPU_THREADS)
@pytest.mark.parametrize("tier", CPU_TIERS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_cpu_decode_attention(benchmark, cpu_run, shape, tier, threads):
    inputs = _cpu_inputs(shape)
    bufs = _cpu_buffers(inputs, tier)
    q, b, hq, hkv, d, n = inputs["q"], *shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # correctness guard: the timed call against SDPA on the K/V the buffer holds (gather: dequantized)
    k_deq, v_deq = bufs[0].gather(0, n)
    want = sdpa(q, k_deq, v_deq, enable_gqa=True)
    got = bufs[0].attend(q)[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (1e-5 if Tier.parse(tier).bits >= 16 else 2e-2), f"{tier}: relative error {rel:.2e}"
    del k_deq, v_deq

    counter = {"ours": 0}

    def ours():
        bufs[counter["ours"] % len(bufs)].attend(q)
        counter["ours"] += 1

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (ours_t, sdpa32_t, sdpa16_t), (ours_c, sdpa32_c, sdpa16_c) = _interleaved(
            [ours, lambda: sdpa(q, inputs["k"], inputs["v"], enable_gqa=True),
             lambda: sdpa(inputs["q16"], inputs["k16"], inputs["v16"], enable_gqa=True)], CPU_ROUNDS)
        benchmark.pedantic(ours, rounds=max(3, CPU_ROUNDS // 2), iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)

    mem = bufs[0].memory()
    io = 2 * q.numel() * 4
    bytes_ours = sum(mem.tier_bytes.values()) + mem.table_bytes + bufs[0].tail_len * b * hkv * d * 4 * 2 + io
    kv = 2 * b * hkv * n * d
    probe = _CPU["probe"][str(threads)]["gbps"]
    o, s32, s16 = quantiles(ours_t), quantiles(sdpa32_t), quantiles(sdpa16_t)

    info = {"shape": dict(zip(("B", "Hq", "Hkv", "D", "N"), shape)), "tier": tier, "threads": threads,
            "isa": kvprec._native.cpu_isa(), "input_sets": len(bufs), "rel_err_vs_sdpa_fp32_on_held_kv": rel,
            **with_rate(o, bytes_ours, probe),
            "sdpa_fp32": with_rate(s32, kv * 4 + io, probe), "sdpa_bf16": with_rate(s16, kv * 2 + io // 2, probe),
            "speedup_vs_sdpa_fp32": s32["median_us"] / o["median_us"],
            "speedup_vs_sdpa_bf16": s16["median_us"] / o["median_us"]}
    if threads == 1:  # the same calls in thread CPU time: what other processes on the cores do not inflate
        oc, c32, c16 = quantiles(ours_c), quantiles(sdpa32_c), quantiles(sdpa16_c)
        info["thread_cpu"] = {**with_rate(oc, bytes_ours, _CPU["probe_thread_cpu"]["gbps"]),
                              "sdpa_fp32": c32, "sdpa_bf16": c16,
                              "speedup_vs_sdpa_fp32": c32["median_us"] / oc["median_us"],
                              "speedup_vs_sdpa_bf16": c16["median_us"] / oc["median_us"]}
    benchmark.extra_info.update(info)
    _CPU["cases"].append(info)


def _cpu_summary(cases):
    """2-thread over 1-thread speed at batch 1, batch-8 ratios over batch-1 ratios (1 thread), and the targets; the
    1-thread ones again in thread CPU time (``*_thread_cpu``), which a machine shared with other work inflates less."""
    by = {(c["shape"]["B"], c["tier"], c["threads"]): c for c in cases}
    b1 = min((c["shape"]["B"] for c in cases), default=1)
    b8 = max((c["shape"]["B"] for c in cases), default=1)
    out = {"two_thread_speedup": {}, "batch_ratio_over_batch1": {}, "targets": []}
    for tier in CPU_TIERS:
        one, two = by.get((b1, tier, 1)), by.get((b1, tier, 2))
        if one and two:
            out["two_thread_speedup"][tier] = one["median_us"] / two["median_us"]
        big = by.get((b8, tier, 1))
        if one and big and b8 != b1:
            out["batch_ratio_over_batch1"][tier] = {
                k: big[k] / one[k] for k in ("speedup_vs_sdpa_fp32", "speedup_vs_sdpa_bf16")}
    for tier, want in CPU_TARGETS.items():
        one = by.get((b1, tier, 1))
        if not one:
            continue
        got = {"sdpa_bf16": one["speedup_vs_sdpa_bf16"], "sdpa_fp32": one["speedup_vs_sdpa_fp32"],
               "pct_of_probe": one["pct_of_probe"]}
        for what, target in want.items():
            out["targets"].append({"tier": tier, "what": what, "target": target, "measured": got[what],
                                   "met": got[what] >= target})
    for tier, x in out["two_thread_speedup"].items():
        out["targets"].append({"tier": tier, "what": "two_thread_speedup", "target": 1.7, "measured": x,
                               "met": x >= 1.7})
    for tier, r in out["batch_ratio_over_batch1"].items():
        x = min(r.values())
        out["targets"].append({"tier": tier, "what": "batch8_ratio_over_batch1 (min of both)", "target": 0.8,
                               "measured": x, "met": x >= 0.8})
    out["batch_ratio_over_batch1_thread_cpu"], out["targets_thread_cpu"] = {}, []
    for tier in CPU_TIERS:
        one, big = by.get((b1, tier, 1)), by.get((b8, tier, 1))
        if one and big and b8 != b1 and "thread_cpu" in one and "thread_cpu" in big:
            out["batch_ratio_over_batch1_thread_cpu"][tier] = {
                k: big["thread_cpu"][k] / one["thread_cpu"][k]
                for k in ("speedup_vs_sdpa_fp32", "speedup_vs_sdpa_bf16")}
        if tier in CPU_TARGETS and one and "thread_cpu" in one:
            got = {w: one["thread_cpu"]["pct_of_probe" if w == "pct_of_probe" else f"speedup_vs_{w}"]
                   for w in CPU_TARGETS[tier]}
            out["targets_thread_cpu"] += [{"tier": tier, "what": w, "target": t, "measured": got[w], "met": got[w] >= t}
                                          for w, t in CPU_TARGETS[tier].items()]
    for tier, r in out["batch_ratio_over_batch1_thread_cpu"].items():
        x = min(r.values())
        out["targets_thread_cpu"].append({"tier": tier, "what": "batch8_ratio_over_batch1 (min of both)",
                                          "target": 0.8, "measured": x, "met": x >= 0.8})
    return out
