"""One prefill chunk's attention on the CPU: the block kernel against the split path of kvprec/hf/prefill.py and
against what DynamicCache runs (SDPA over dense K/V), at SmolLM2-135M-Instruct's heads (9 query / 3 KV, head_dim 64).

    OMP_NUM_THREADS=1 python -m pytest bench/bench_prefill_attention.py -q      # KVPREC_BENCH_ROUNDS (default 5)

Per (tier, earlier positions E, chunk length Q): a buffer holds E positions and then the chunk's Q (block size 64,
every block at the tier, FP32 model); the Q newest queries attend over all E + Q positions, three ways, timed in
turn round after round (time.perf_counter around each call; one warm-up call each) on one thread:

* ``kernel``: ``MixedPrecisionBuffer.attend`` (the block kernel, the path before the split);
* ``split``: ``prefill.attend_split`` (the stored K/V read back part by part through torch's flash-attention kernel,
  merged by log-sum-exp; pytest-benchmark times this one on its own as well);
* ``sdpa_dense``: ``scaled_dot_product_attention(enable_gqa=True)`` over the FP32 K/V with the bottom-right causal
  mask transformers builds for a chunk after a cache (DynamicCache's prefill attention).

The JSON (bench/results/, results_file.py) holds the processor, kvprec CPU path, versions, per case the median and
p20/p80 microseconds of each call, split / kernel and split / sdpa_dense, and per (tier, E) the smallest Q measured
at which the split is faster than the kernel (what prefill.MIN_QUERIES is set from).
"""
from __future__ import annotations

import os

import pytest
import torch

import kvprec
from kvprec.hf import prefill
from kvprec.storage.formats import Tier
from bench_decode_attention import _interleaved
from results_file import cpu_info, quantiles, write_results

ROUNDS = int(os.environ.get("KVPREC_BENCH_ROUNDS", "5"))
HEADS = (1, 9, 3, 64)  # B, Hq, Hkv, D
EARLIER = [3072, 7168]
CHUNKS = [16, 64, 128, 256, 1024]
TIERS = ["fp32", "int4"]
_RESULTS: dict = {"cases": []}


@pytest.fixture(scope="module")
def run():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    _RESULTS.update(cpu_info(), threads=1, rounds=ROUNDS, block_size=64, model_dtype="float32",
                    min_queries=prefill.MIN_QUERIES, segment=prefill.SEGMENT)
    yield _RESULTS
    torch.set_num_threads(old)
    _RESULTS["split_faster_from_q"] = _crossover(_RESULTS["cases"])
    print("\nwrote", write_results("prefill_attention-cpu", _RESULTS, device=_RESULTS["model"]))


def _crossover(cases) -> list:
    out = []
    for tier in TIERS:
        for e in EARLIER:
            rows = sorted((c for c in cases if c["tier"] == tier and c["earlier"] == e), key=lambda c: c["Q"])
            faster = [c["Q"] for c in rows if c["split_over_kernel"] < 1.0]
            out.append({"tier": tier, "earlier": e, "smallest_q_split_faster": min(faster) if faster else None})
    return out


@pytest.mark.parametrize("nq", CHUNKS)
@pytest.mark.parametrize("earlier", EARLIER)
@pytest.mark.parametrize("tier", TIERS)
@torch.no_grad()
def test_cpu_prefill_attention(benchmark, run, tier, earlier, nq):
    b, hq, hkv, d = HEADS
    n = earlier + nq
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, hkv, n, d, generator=gen) for _ in range(2))
    q = torch.randn(b, hq, nq, d, generator=gen)
    buf = kvprec.MixedPrecisionBuffer(b, hkv, d, 64, dtype=torch.float32, default_tier=Tier.parse(tier))
    buf.append(k[:, :, :earlier], v[:, :, :earlier])
    buf.append(k[:, :, earlier:], v[:, :, earlier:])
    layer = type("Layer", (), {"buffer": buf, "evicted_blocks": 0})()
    causal = torch.ones(nq, n, dtype=torch.bool).tril(earlier)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def split():
        return prefill.attend_split(layer, q, None, 0.0, 0)

    # correctness guard: the split against the block kernel on the same stored K/V
    got, want = split()[0], buf.attend(q)[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (1e-5 if tier == "fp32" else 2e-2), f"{tier}: relative error {rel:.2e}"

    kernel_t, split_t, dense_t = _interleaved(
        [lambda: buf.attend(q), split, lambda: sdpa(q, k, v, attn_mask=causal, enable_gqa=True)], ROUNDS)[0]
    benchmark.pedantic(split, rounds=max(3, ROUNDS // 2), iterations=1, warmup_rounds=1)
    kq, sq, dq = quantiles(kernel_t), quantiles(split_t), quantiles(dense_t)
    info = {"tier": tier, "earlier": earlier, "Q": nq, "heads": dict(zip(("B", "Hq", "Hkv", "D"), HEADS)),
            "isa": kvprec._native.cpu_isa(), "rel_err_split_vs_kernel": rel, "kernel": kq, "split": sq,
            "sdpa_dense": dq, "split_over_kernel": sq["median_us"] / kq["median_us"],
            "split_over_sdpa_dense": sq["median_us"] / dq["median_us"]}
    benchmark.extra_info.update(info)
    _RESULTS["cases"].append(info)
