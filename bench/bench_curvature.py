"""Curvature reduction for calibration (kvprec.analysis.curvature.curvature_reduce): Triton against the FP64 torch
reference, on the Llama-3.2-1B attention shape; and calibration itself (KVCacheAnalyzer.add_calibration,
Curvature.calibrate) with the Triton path against the C++ path on host copies.

    python -m pytest bench/bench_curvature.py -q                       # on a CUDA machine; skips without one
    KVPREC_BENCH_SMOKE=1 python -m pytest bench/bench_curvature.py -q  # the calibration cases on a tiny model on
                                                                       # CPU (Triton interpreter): the flow only

The question it answers: how long does analysing 8k tokens of calibration take? One input is 8192 cached positions
(B = 1, Hq = 32, Hkv = 8, head_dim 64, BF16 as the model runs) and the queries of the last 64 positions, or of
all 8192 (causal, query_reduce "mean", block_reduce "max", block size 64). Cases:

* ``layer``: one curvature_reduce call on one layer's q, K, V;
* ``model``: the 16 layers one after another, each with its own inputs (16 MB of K/V per layer, 256 MB in all,
  so the L2 (50 MB on an H100) never holds the next layer's K/V).

Times are CUDA events around eager calls (host checks included; the checks read every input once for
non-finite values, as the reference's contract requires), median and p20/p80 over rounds, with inputs rotated
over 16 layer sets so that no call finds its K/V in L2. pytest-benchmark times the same call, synchronized, with
``benchmark.pedantic``. The C++ kernel runs on CPU tensors only and is not timed here. The torch reference
materialises about eight [B, Hq, Q, N] FP64 tensors, so with all 8192 queries it needs ~130 GiB and is skipped
(the reason is recorded). Figures go to ``benchmark.extra_info`` and, at the end of the module, to one JSON
file under bench/results/ with the device, versions, shapes and, per case, the triton / reference speedup.

Calibration cases (a second JSON, ``curvature_calibrate-*.json``, same conventions), a prefill of N = 8192 tokens
(every position's query: Q = N):

* ``analysis``: KVCacheAnalyzer.add_calibration over the 16 layers, random q, K, V of the 1B shape in BF16 and
  FP16, a fresh analyzer per round. ``triton`` (what backend="auto" picks on a GPU): two curvature_reduce calls
  per layer (query_reduce sum and max) on the device, then [Hkv, N] FP64 statistics twice to the host;
  ``cpp``: q, K, V copied to the host and the C++ FP64 closed form there. The C++ path is timed (one round, BF16
  only: it computes in FP64 whatever the dtype) only when one layer, timed first, projects the 16 to at most
  CPU_PATH_LIMIT_S; otherwise the case records why not.
* ``calibrate``: the whole Curvature.calibrate(mode="budget", bits_per_element=6) of a random-weight BF16
  Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 / 8 heads of 64) on one [1, 8192] input: the forward
  through the kvprec attention with a throw-away FP32-page cache, each layer's capture and analysis, and the
  budget map. Recorded beside it, each measured on its own: the forward alone (``forward_ms``) and the map
  (``map_ms``). The cpp backend runs only where the analysis case's cpp path ran.

Times: CUDA events around eager calls that end in a host copy (so the host work is inside), median and p20/p80;
pytest-benchmark drives the same calls (``benchmark.pedantic``).
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

SMOKE = os.environ.get("KVPREC_BENCH_SMOKE") == "1"
if not SMOKE and not torch.cuda.is_available():
    pytest.skip("curvature benchmarks need a CUDA device (KVPREC_BENCH_SMOKE=1 runs the calibration flow on a tiny "
                "model on CPU)", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_kernels is imported
triton = pytest.importorskip("triton")

import kvprec  # noqa: E402
from kvprec import ops  # noqa: E402
from kvprec.analysis import curvature as C  # noqa: E402
from kvprec.ops.triton import curvature as tc  # noqa: E402

from results_file import git_commit, quantiles, write_results  # noqa: E402

if DEVICE == "cuda":
    from bench_decode_attention import _event_times  # noqa: E402  (same timing conventions)
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="the curvature_reduce cases need a CUDA device")

LAYERS, HQ, HKV, D, N = 16, 32, 8, 64, 8192   # Llama-3.2-1B: 16 layers, 32 query heads, 8 KV heads, head_dim 64
DTYPE = torch.bfloat16
BLOCK_SIZE = 64
QUERIES = {"last64": 64, "all": N}
ROUNDS = {"layer": 20, "model": 5}
REFERENCE_ROUNDS = {"layer": 5, "model": 2}
WARMUP = 2
_RESULTS: dict = {"cases": []}


@pytest.fixture(scope="module")
def layer_inputs():
    """16 layer sets (q of all N positions, K, V): the cases slice the last Q queries."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=DTYPE, generator=gen)  # noqa: E731
    sets = [(mk(1, HQ, N, D), mk(1, HKV, N, D), mk(1, HKV, N, D)) for _ in range(LAYERS)]
    _RESULTS.update(_environment())
    _RESULTS.update({
        "shape": {"layers": LAYERS, "B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "N": N, "dtype": str(DTYPE)},
        "block_size": BLOCK_SIZE, "query_reduce": "mean", "block_reduce": "max", "causal": True,
        "backend_auto": ops.resolve_backend("curvature_reduce", "auto", torch.device("cuda")),
    })
    yield sets
    _summarise()
    write_results("curvature_reduce", _RESULTS)


def _environment() -> dict:
    """Device, versions and commit: the header of every results file of this module."""
    env = {"torch": torch.__version__, "triton": triton.__version__, "kvprec": kvprec.__version__,
           "python": platform.python_version(),
           "git_commit": git_commit()}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"device": props.name, "sm_count": props.multi_processor_count, "cuda": torch.version.cuda})
    return env


def _summarise() -> None:
    """Triton / reference speedup per (queries, scope), where both ran."""
    by_key = {(c["queries"], c["scope"], c["backend"]): c for c in _RESULTS["cases"]}
    _RESULTS["speedup_vs_reference"] = {
        f"{qk}-{scope}": ref["median_us"] / tri["median_us"]
        for (qk, scope, backend), tri in by_key.items() if backend == "triton"
        for ref in [by_key.get((qk, scope, "torch"))] if ref is not None and "median_us" in ref}


def _reference_bytes(nq: int) -> int:
    return 8 * HQ * nq * N * 8  # ~8 live [1, Hq, Q, N] FP64 tensors in _closed_form


@cuda_only
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scope", ["layer", "model"])
@pytest.mark.parametrize("queries", list(QUERIES))
def test_curvature_reduce(benchmark, layer_inputs, queries, scope, backend):
    nq = QUERIES[queries]
    case = {"queries": queries, "Q": nq, "scope": scope, "backend": backend}
    if backend == "torch":
        free = torch.cuda.mem_get_info()[0]
        if _reference_bytes(nq) > 0.8 * free:
            case["skipped"] = f"the FP64 reference needs ~{_reference_bytes(nq) / 2**30:.0f} GiB, " \
                              f"{free / 2**30:.0f} GiB free"
            _RESULTS["cases"].append(case)
            pytest.skip(case["skipped"])
    sets = [(q[:, :, N - nq:], k, v) for q, k, v in layer_inputs]

    def one(s):
        return C.curvature_reduce(*s, 0.0, True, BLOCK_SIZE, "mean", "max", backend=backend)

    if backend == "triton" and nq <= 64:
        # correctness guard: the timed kernel agrees with the FP64 reference on layer 0 (the test's tolerance)
        got, ref = one(sets[0]), C.curvature_reduce_reference(*sets[0], 0.0, True, BLOCK_SIZE, "mean", "max")
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=5e-5, atol=3e-5 * float(r.abs().max()))

    if scope == "layer":
        fn, items = one, sets
    else:
        def fn(_):
            for s in sets:
                one(s)
        items = [None]
    rounds = (ROUNDS if backend == "triton" else REFERENCE_ROUNDS)[scope]
    times = _event_times(fn, items, rounds, WARMUP)
    counter = iter(range(10 ** 9))

    def timed():  # what pytest-benchmark times: one synchronized call (layer: on the next layer's inputs)
        fn(items[next(counter) % len(items)])
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = quantiles(times)
    case.update(stats)
    if backend == "triton":
        cfg = tc.block_sizes(HKV, HQ // HKV * nq, N, D, D, torch.device("cuda"))
        case["block_sizes"] = cfg
        case["kv_passes"] = triton.cdiv(HQ // HKV * nq, cfg["BLOCK_M1"]) + 1  # launcher docstring
    benchmark.extra_info.update(case)
    _RESULTS["cases"].append(case)


# ---------------------------------------------------------------------------------------------------------
# Calibration: KVCacheAnalyzer.add_calibration over 16 layers and Curvature.calibrate on 8k tokens

from kvprec.analysis.analyzer import KVCacheAnalyzer  # noqa: E402
from kvprec.hf.policy import Curvature  # noqa: E402

# (layers, Hq, Hkv, D, N): the 1B shape; the smoke run a tiny Llama (Triton interpreter, FP32)
CALIB_SHAPE = (2, 4, 2, 32, 64) if SMOKE and DEVICE == "cpu" else (LAYERS, HQ, HKV, D, N)
CALIB_DTYPES = {"fp32": torch.float32} if DEVICE == "cpu" else {"bf16": torch.bfloat16, "fp16": torch.float16}
CALIB_ROUNDS = {"analysis": 3, "calibrate": 2}  # triton; the C++ path runs one round, after no warm-up
CPU_PATH_LIMIT_S = 300.0  # the C++ path's 16 layers are timed only when one layer projects them below this
BITS_PER_ELEMENT = 6.0
_CALIB: dict = {"cases": []}


@pytest.fixture(scope="module")
def calibration_results():
    """The calibration cases' results; written as one JSON at the end of the module (not by a smoke run)."""
    layers, hq, hkv, d, n = CALIB_SHAPE
    from kvprec.analysis.analyzer import calibration_backend
    _CALIB.update(_environment())
    _CALIB.update({"shape": {"layers": layers, "B": 1, "Hq": hq, "Hkv": hkv, "D": d, "N": n, "Q": n},
                   "block_size": BLOCK_SIZE, "query_reduce": "mean", "causal": True,
                   "cpu_path_limit_s": CPU_PATH_LIMIT_S, "cpu_threads": torch.get_num_threads(),
                   "backend_auto": calibration_backend("auto", torch.device(DEVICE))})
    yield _CALIB
    if _CALIB["cases"] and not SMOKE:
        write_results("curvature_calibrate", _CALIB)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed_rounds(benchmark, fn, rounds: int, warmup: int) -> list:
    """Per-call times (us) of fn(): CUDA events on a GPU (fn ends in host copies, so its host work is inside),
    wall clock on CPU. pytest-benchmark drives exactly these calls."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []

    def timed():
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    return times


def _calibration_inputs(dtype):
    """Per layer, a prefill's (q [1, Hq, N, D], K, V [1, Hkv, N, D]) of random values."""
    layers, hq, hkv, d, n = CALIB_SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    mk = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)  # noqa: E731
    return [(mk(1, hq, n, d), mk(1, hkv, n, d), mk(1, hkv, n, d)) for _ in range(layers)]


def _analyze_layers(sets, backend: str, layers=None) -> KVCacheAnalyzer:
    analyzer = KVCacheAnalyzer(head_dim=CALIB_SHAPE[3], block_size=BLOCK_SIZE)
    for layer, (q, k, v) in enumerate(sets[:layers]):
        analyzer.add_calibration(layer, q, k, v, backend=backend)
    return analyzer


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", list(CALIB_DTYPES))
def test_calibration_analysis(benchmark, calibration_results, dtype, backend):
    layers, hq, hkv, d, n = CALIB_SHAPE
    case = {"case": "analysis", "dtype": dtype, "backend": backend, "layers": layers}
    sets = _calibration_inputs(CALIB_DTYPES[dtype])
    if backend == "triton":
        # correctness guard: the last 64 queries of layer 0 against the C++ path, at the kernel's tolerance
        guard = [(q[:, :, -64:], k, v) for q, k, v in sets[:1]]
        got, ref = _analyze_layers(guard, "triton").curvature(0), _analyze_layers(guard, "cpp").curvature(0)
        assert torch.equal(got.count, ref.count)
        for g, r in ((got.sum, ref.sum), (got.max, ref.max)):
            torch.testing.assert_close(g, r, rtol=5e-5, atol=3e-5 * float(r.abs().max()))
        case["host_bytes_per_layer"] = 2 * hkv * n * 8 + n * 8  # pos_sum, pos_max FP64 and the count
        rounds, warmup = CALIB_ROUNDS["analysis"], 1
    else:
        case["host_bytes_per_layer"] = (hq + 2 * hkv) * n * d * sets[0][0].element_size()  # q, K, V copies
        if dtype != next(iter(CALIB_DTYPES)):
            case["skipped"] = (f"the C++ path computes in FP64 from host copies whatever the dtype: timed once, "
                               f"for {next(iter(CALIB_DTYPES))}")
            calibration_results["cases"].append(case)
            pytest.skip(case["skipped"])
        _sync()
        t0 = time.perf_counter()
        _analyze_layers(sets, "cpp", layers=1)
        one = time.perf_counter() - t0
        case["one_layer_s"] = one
        if one * layers > CPU_PATH_LIMIT_S:
            case["skipped"] = (f"the C++ path took {one:.1f} s for one layer ({torch.get_num_threads()} CPU threads), "
                               f"~{one * layers:.0f} s for {layers}: above CPU_PATH_LIMIT_S = {CPU_PATH_LIMIT_S:.0f}")
            calibration_results["cases"].append(case)
            pytest.skip(case["skipped"])
        rounds, warmup = 1, 0
    analyzers = []
    times = _timed_rounds(benchmark, lambda: analyzers.append(_analyze_layers(sets, backend)), rounds, warmup)
    assert analyzers[-1].backends == {backend: layers}
    case.update(quantiles(times))
    case["per_layer_ms"] = case["median_us"] / layers / 1e3
    benchmark.extra_info.update(case)
    calibration_results["cases"].append(case)
    _summarise_calibration(calibration_results)


def _calibration_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hq, hkv, d, _ = CALIB_SHAPE
    if DEVICE == "cpu":
        cfg = LlamaConfig(vocab_size=256, hidden_size=hq * d, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, max_position_embeddings=4096)
        dtype = torch.float32
    else:  # Llama-3.2-1B's shape (bench_generate.py), random weights
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                          num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=True)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def calibration_model():
    model = _calibration_model()
    yield model
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@torch.no_grad()
def test_calibration_calibrate(benchmark, calibration_results, calibration_model, backend):
    from kvprec.hf.cache import AdaptiveCache
    from kvprec.storage.formats import Tier
    from kvprec.hf.policy import Uniform
    from kvprec.hf.policy import curvature as policy_module

    model = calibration_model
    layers, _, _, _, n = CALIB_SHAPE
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(2))
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[model.dtype]
    case = {"case": "calibrate", "dtype": dtype, "backend": backend, "layers": layers, "tokens": n,
            "mode": "budget", "bits_per_element": BITS_PER_ELEMENT}
    if backend == "cpp":
        ran = [c for c in calibration_results["cases"] if c["case"] == "analysis" and c["backend"] == "cpp"
               and "median_us" in c]
        if not ran:
            case["skipped"] = "the analysis case's C++ path did not run (above CPU_PATH_LIMIT_S, or deselected)"
            calibration_results["cases"].append(case)
            pytest.skip(case["skipped"])

    def calibrate():
        return Curvature.calibrate(model, ids, mode="budget", bits_per_element=BITS_PER_ELEMENT,
                                   block_size=BLOCK_SIZE, group_size=32, backend=backend)

    policies, analyzers = [], []
    rounds, warmup = (CALIB_ROUNDS["calibrate"], 1) if backend == "triton" else (1, 0)
    run_calibration = policy_module._calibrate
    policy_module._calibrate = lambda *a: analyzers.append(run_calibration(*a)) or analyzers[-1]  # keep the analyzer
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        times = _timed_rounds(benchmark, lambda: policies.append(calibrate()), rounds, warmup)
    finally:
        policy_module._calibrate = run_calibration
    assert policies[-1].calibration_backends == {backend: layers}
    case.update(quantiles(times))
    if DEVICE == "cuda":
        case["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30

    # The pieces, each on its own: the forward that captures q, K, V (no analysis), and the budget map.
    def forward():
        cache = AdaptiveCache(model.config, policy=Uniform(Tier.FP32), block_size=BLOCK_SIZE, group_size=32)
        with kvprec.enabled(model):
            model(input_ids=ids.to(DEVICE), past_key_values=cache, use_cache=True)
        _sync()
    forward()
    t0 = time.perf_counter()
    forward()
    case["forward_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    analyzers[-1].analyze("budget", bits_per_element=BITS_PER_ELEMENT)
    case["map_ms"] = (time.perf_counter() - t0) * 1e3
    case["bits_per_element_mapped"] = policies[-1].map.bits_per_element
    benchmark.extra_info.update(case)
    calibration_results["cases"].append(case)
    _summarise_calibration(calibration_results)


def _summarise_calibration(results: dict) -> None:
    """cpp / triton time per (case, dtype), where both ran."""
    by_key = {(c["case"], c["dtype"], c["backend"]): c for c in results["cases"] if "median_us" in c}
    results["speedup_triton_vs_cpp"] = {
        f"{case}-{dtype}": cpp["median_us"] / tri["median_us"]
        for (case, dtype, backend), tri in by_key.items() if backend == "triton"
        for cpp in [by_key.get((case, dtype, "cpp"))] if cpp is not None}
