"""quantize_append on a 16k-token prefill (B=1, Hkv=8, D=128, T=64, FP16 K or V) per backend, against a
device-to-device copy of the same input bytes measured in the same run.

Run on a CUDA machine: ``python -m pytest bench/bench_quantize_append.py -q`` (skips without CUDA). The input is
what the buffer's seal hands over: x [B, Hkv, NB, T, D] (a view of [B, Hkv, L, D]), device-held pages [B, Hkv, NB]
in a random order, one pool per input set; ``check=False``, so nothing synchronises inside the timed call.
Times are CUDA events around one eager call (launcher host work included), over input sets rotated so that the
L2 (50 MB on an H100) never holds the next call's input (cold L2), with the helpers of
bench_decode_attention.py. Per case, recorded in ``benchmark.extra_info`` and in one JSON file under
bench/results/: median and p20/p80 in microseconds; bytes = input read + pages index read + packed codes and
FP16 scale/zero written; effective GB/s = bytes / median; the copy's GB/s = 2 * input bytes / its median
(read + write of the same bytes); % of copy = ours / copy.
"""
from __future__ import annotations

import platform

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("quantize_append benchmarks need a CUDA device", allow_module_level=True)

import kvprec  # noqa: E402
from kvprec import ops  # noqa: E402
from kvprec.storage.formats import Tier  # noqa: E402

from bench_decode_attention import L2_BYTES, _event_times  # noqa: E402
from results_file import git_commit, quantiles, write_results  # noqa: E402

B, HKV, D, L, T, G = 1, 8, 128, 16384, 64, 32
NB = L // T
ROUNDS, WARMUP = 50, 5
TIERS = {"int4": Tier.INT4, "int8": Tier.INT8}
BACKENDS = [b for b in ("cuda", "triton", "torch") if ops._why_unavailable(ops.REGISTRY["quantize_append"], b,
                                                                        torch.device("cuda")) is None]
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


@pytest.mark.parametrize("keys", [True, False], ids=["keys", "values"])
@pytest.mark.parametrize("tier", list(TIERS), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_append(benchmark, copy_times, backend, tier, keys):
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
