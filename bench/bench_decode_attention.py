"""Decode attention over a mixed-precision paged cache (Triton and CUDA flash-decoding) against torch SDPA on FP16
K/V.

Run on a CUDA machine: ``python -m pytest bench/bench_decode_attention.py -q`` (skips without CUDA). Each case
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
import platform

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("decode attention benchmarks need a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")

import kvprec  # noqa: E402
from kvprec import ops  # noqa: E402
from kvprec.storage.formats import BlockGeometry, Tier  # noqa: E402
from kvprec.ops.reference import PagedKV  # noqa: E402
from kvprec.ops.triton import decode_attention as tda  # noqa: E402
from results_file import git_commit, quantiles, write_results  # noqa: E402

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
CUDA_KERNELS = kvprec.cuda_kernels_available()


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


@pytest.mark.parametrize("tiers", list(TIERS), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-hq{}-hkv{}-d{}-n{}".format(*s))
def test_decode_attention(benchmark, copy_bandwidth, shape, tiers):
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
