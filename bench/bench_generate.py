"""Decode speed and memory of generate on a random-weight Llama-3.2-1B-shaped model (hidden 2048, 16 layers,
32 query / 8 KV heads of head_dim 64, FP16): kvprec.AdaptiveCache against DynamicCache() and, where the
packages are installed, transformers' QuantizedCache(backend="quanto" | "hqq", nbits=4), in the same run.

    python -m pytest bench/bench_generate.py -q            # on a CUDA machine; skips without one
    KVPREC_BENCH_SMOKE=1 python -m pytest bench/bench_generate.py -q   # a tiny model on CPU: checks the flow only

Per (batch, context) and cache: the prompt is prefilled in chunks (not timed), then ``STEPS`` decode steps of one
token per row are timed with CUDA events (median and p20/p80 of the per-step times); decode tokens/s =
batch / median step; peak memory over the weights during decode (torch.cuda.max_memory_allocated after a
reset, minus the weights) and the cache's resident bytes (AdaptiveCache: its own accounting; dense caches:
2 * layers * B * Hkv * N * D * 2). The host shadow's cost is the ``shadow=cpu`` row against the plain INT4 one (speed) and its host_shadow_bytes.
Figures go to benchmark.extra_info and one JSON under bench/results/ with
the device, versions and shapes, and each cache's ratio against DynamicCache() measured in the same run.
Note (transformers 5.17): generate's default DynamicCache(config=...) was 4x slower per step than a plain
DynamicCache(); the baseline here is the plain one.
"""
from __future__ import annotations


import pytest
import torch

import kvprec
from decode_timing import mode, prefill, sync, time_decode
from results_file import write_results

SMOKE, DEVICE, DTYPE = mode("generate benchmarks")
CASES = [(1, 96), (2, 64)] if SMOKE else [(1, 4096), (1, 16384), (8, 8192), (32, 8192)]
STEPS = 4 if SMOKE else 32
CHUNK = 32 if SMOKE else 1024
_RESULTS: dict = {"cases": []}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    if SMOKE:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(DTYPE).eval()
    return model


@pytest.fixture(scope="module")
def model():
    m = _model()
    yield m
    if _RESULTS["cases"] and not SMOKE:  # a smoke run checks the flow; only GPU runs are recorded
        _RESULTS.update(_environment(m))
        write_results("generate", _RESULTS)


def _environment(model) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "kvprec": kvprec.__version__,
           "dtype": str(DTYPE), "steps": STEPS, "prefill_chunk": CHUNK,
           "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "num_key_value_heads", "head_dim", "vocab_size")}}
    if not SMOKE:
        env["device"] = torch.cuda.get_device_name()
    return env


def _caches(model):
    """name -> (factory, attention implementation)."""
    from transformers import DynamicCache

    out = {"DynamicCache": (DynamicCache, "sdpa"),
           "kvprec uniform:int4": (lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4"), "kvprec"),
           "kvprec sink_window": (lambda: kvprec.AdaptiveCache(model.config, policy="sink_window"), "kvprec"),
           # the key rotation's cost (one small product for the new keys and one for the queries per layer and step)
           "kvprec uniform:int4 key_rotation": (
               lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4", key_rotation="hadamard"), "kvprec"),
           # the cost of the host shadow (promotion, exact crop): a device-to-host copy of every sealed block
           "kvprec uniform:int4 shadow=cpu": (
               lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4", shadow="cpu"), "kvprec")}
    try:
        from transformers import QuantizedCache
    except ImportError:  # pragma: no cover - old transformers
        return out
    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq.core.quantize")):
        try:
            __import__(module)
        except ImportError:
            continue
        out[f"QuantizedCache {backend} int4"] = (
            lambda backend=backend: QuantizedCache(backend=backend, config=model.config, nbits=4), "sdpa")
    return out


def _dense_cache_bytes(model, batch: int, tokens: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * tokens * head_dim * torch.finfo(DTYPE).bits // 8


CACHE_NAMES = ["DynamicCache", "kvprec uniform:int4", "kvprec uniform:int4 shadow=cpu",
               "kvprec uniform:int4 key_rotation", "kvprec sink_window",
               "QuantizedCache quanto int4", "QuantizedCache hqq int4"]


@pytest.mark.parametrize("cache_name", CACHE_NAMES)
@pytest.mark.parametrize("batch,context", CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_generate_decode(benchmark, model, batch, context, cache_name):
    import contextlib

    caches = _caches(model)
    if cache_name not in caches:
        pytest.skip(f"{cache_name}: its package is not installed (carry the wheel to the GPU machine)")
    make, attn = caches[cache_name]
    cache = make()
    guard = kvprec.enabled(model) if attn == "kvprec" else contextlib.nullcontext()
    if attn != "kvprec":
        model.set_attn_implementation(attn)
    with guard:
        token = prefill(model, cache, batch, context, CHUNK, DEVICE)
        sync(DEVICE)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timing = time_decode(benchmark, model, cache, token, STEPS, DEVICE)
    tokens = context + STEPS + 2
    row = {"batch": batch, "context": context, "cache": cache_name, **timing,
           "cache_bytes": int(cache.memory_report().resident_bytes if hasattr(cache, "memory_report")
                              else _dense_cache_bytes(model, batch, tokens)),
           "peak_over_weights_bytes": (torch.cuda.max_memory_allocated() - weights) if DEVICE == "cuda" else None,
           "host_shadow_bytes": (int(cache.memory_report().shadow_bytes.sum()) if hasattr(cache, "memory_report")
                                 else 0)}
    base = next((r for r in _RESULTS["cases"] if r["cache"] == "DynamicCache" and r["batch"] == batch
                 and r["context"] == context), None)
    if base is not None:  # measured in this run, just before (DynamicCache is the first parameter)
        row["speed_vs_dynamic"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["cache_bytes_vs_dynamic"] = row["cache_bytes"] / base["cache_bytes"]
        if base["peak_over_weights_bytes"]:
            row["peak_vs_dynamic"] = row["peak_over_weights_bytes"] / base["peak_over_weights_bytes"]
    _RESULTS["cases"].append(row)
    benchmark.extra_info.update(row)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
