"""One decode step's attention over every layer of a small GQA model on the CPU: SmolLM2-135M's geometry (30 layers,
3 KV heads, head_dim 64) at 8192 positions, 1 thread, against SDPA over the same K/V in the same process.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_decode_layers.py -q

Per tier (FP32 / FP16 / INT8 / INT4 / INT2, every block at that tier, FP32 model dtype) and per query-head count
Hq = 3, 6, 9, 12 (1, 2, 3, 4 query rows per KV head; SmolLM2 has 9), one case times 30 ``MixedPrecisionBuffer.attend``
calls, one per layer's buffer, and 30 ``scaled_dot_product_attention(enable_gqa=True)`` calls over FP32 K/V (what
DynamicCache's decode attention runs), in turn, round after round (time.perf_counter and the calling thread's CPU
time, time.thread_time, around each group of 30). Each layer has its own buffer and its own K/V, so a step reads
30 layers' worth of cache, more than the last-level cache holds, as a real decode step does.

One JSON under bench/results/ (bench/results_file.py: CPU model and flags, kvprec CPU path, versions, a
streaming-read probe in wall and thread CPU time): per case median / p20 / p80 in microseconds for the 30 calls
(wall and thread CPU), bytes read (the pages the block tables use, the tables, q and out; SDPA: K, V, q and out),
GB/s, % of the probe, and SDPA's median over ours. The summary gives, per tier, the time of 3 rows (Hq = 9) over
4 rows (Hq = 12): above 1 means a group of 3 query heads costs more than one of 4.
"""
from __future__ import annotations

import os

import pytest
import torch

import kvprec
from kvprec import Tier

from bench_decode_attention import _interleaved
from results_file import cpu_info, cpu_read_bandwidth, quantiles, with_rate, write_results

LAYERS, HKV, D, N, BLOCK = 30, 3, 64, 8192, 64
HQS = [3, 6, 9, 12]
TIERS = ["fp32", "fp16", "int8", "int4", "int2"]
ROUNDS = int(os.environ.get("KVPREC_BENCH_ROUNDS", "9"))
_RUN: dict = {"cases": []}
_DATA: dict = {}


@pytest.fixture(scope="module")
def run():
    """The run's processor, kvprec CPU path, 1-thread read probes (wall, thread CPU); writes the JSON at the end."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    _RUN.update(cpu_info())
    _RUN["probe"] = cpu_read_bandwidth(1)
    _RUN["probe_thread_cpu"] = cpu_read_bandwidth(1, clock="thread_cpu")
    _RUN.update({"layers": LAYERS, "block_size": BLOCK, "model_dtype": "float32", "rounds": ROUNDS, "threads": 1})
    yield _RUN
    torch.set_num_threads(old)
    _RUN["summary"] = _summary(_RUN["cases"])
    _DATA.clear()
    write_results("decode_layers-cpu", _RUN, device=_RUN["model"])


def _layers():
    """Per layer its own FP32 K, V [1, HKV, N, D] (built once)."""
    if "kv" not in _DATA:
        gen = torch.Generator().manual_seed(0)
        _DATA["kv"] = [(torch.randn(1, HKV, N, D, generator=gen), torch.randn(1, HKV, N, D, generator=gen))
                       for _ in range(LAYERS)]
    return _DATA["kv"]


def _buffers(tier):
    """Per layer a buffer holding that layer's K/V at `tier` (one tier held at a time)."""
    if _DATA.get("tier") != tier:
        _DATA.pop("bufs", None)
        bufs = []
        for k, v in _layers():
            buf = kvprec.MixedPrecisionBuffer(1, HKV, D, BLOCK, dtype=torch.float32, default_tier=tier)
            buf.append(k, v)
            bufs.append(buf)
        _DATA.update(tier=tier, bufs=bufs)
    return _DATA["bufs"]


@pytest.mark.parametrize("hq", HQS)
@pytest.mark.parametrize("tier", TIERS)
def test_cpu_decode_layers(benchmark, run, tier, hq):
    layers, bufs = _layers(), _buffers(tier)
    q = torch.randn(1, hq, 1, D, generator=torch.Generator().manual_seed(hq))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # correctness guard: layer 0 against SDPA over the K/V its buffer holds (gather: dequantized)
    k_deq, v_deq = bufs[0].gather(0, N)
    want = sdpa(q, k_deq, v_deq, enable_gqa=True)
    rel = ((bufs[0].attend(q)[0] - want).norm() / want.norm()).item()
    assert rel < (1e-5 if Tier.parse(tier).bits >= 16 else 2e-2), f"{tier}: relative error {rel:.2e}"

    def ours():
        for buf in bufs:
            buf.attend(q)

    def dense():
        for k, v in layers:
            sdpa(q, k, v, enable_gqa=True)

    wall, cpu = _interleaved([ours, dense], ROUNDS)
    benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=0)

    mem = bufs[0].memory()
    io = 2 * q.numel() * 4
    bytes_ours = LAYERS * (sum(mem.tier_bytes.values()) + mem.table_bytes + bufs[0].tail_len * HKV * D * 4 * 2 + io)
    bytes_sdpa = LAYERS * (2 * HKV * N * D * 4 + io)

    o, s = quantiles(wall[0]), quantiles(wall[1])
    oc, sc = quantiles(cpu[0]), quantiles(cpu[1])
    info = {"shape": {"layers": LAYERS, "B": 1, "Hq": hq, "Hkv": HKV, "D": D, "N": N}, "tier": tier,
            "isa": kvprec._native.cpu_isa(), "rel_err_vs_sdpa_fp32_on_held_kv": rel,
            **with_rate(o, bytes_ours, _RUN["probe"]["gbps"]),
            "sdpa_fp32": with_rate(s, bytes_sdpa, _RUN["probe"]["gbps"]),
            "speedup_vs_sdpa_fp32": s["median_us"] / o["median_us"],
            "thread_cpu": {**with_rate(oc, bytes_ours, _RUN["probe_thread_cpu"]["gbps"]), "sdpa_fp32": sc,
                           "speedup_vs_sdpa_fp32": sc["median_us"] / oc["median_us"]}}
    benchmark.extra_info.update(info)
    _RUN["cases"].append(info)


def _summary(cases):
    """Per tier: 3 rows (Hq = 9) over 4 rows (Hq = 12) in wall and thread CPU time, and the speed-up over SDPA FP32
    at SmolLM2's Hq = 9."""
    by = {(c["tier"], c["shape"]["Hq"]): c for c in cases}
    out = {}
    for tier in TIERS:
        a, b = by.get((tier, 9)), by.get((tier, 12))
        if a and b:
            out[tier] = {"hq9_over_hq12": a["median_us"] / b["median_us"],
                         "hq9_over_hq12_thread_cpu": a["thread_cpu"]["median_us"] / b["thread_cpu"]["median_us"],
                         "hq9_speedup_vs_sdpa_fp32": a["speedup_vs_sdpa_fp32"],
                         "hq9_speedup_vs_sdpa_fp32_thread_cpu": a["thread_cpu"]["speedup_vs_sdpa_fp32"]}
    return out
