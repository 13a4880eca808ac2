"""Cache memory and decode speed on a sliding-window model: a random-weight Gemma-3-1B-shaped decoder (26 layers,
5 of every 6 with a 512-token sliding window; 4 query / 1 KV head of head_dim 256; FP16 on CUDA).

    python -m pytest bench/bench_sliding_window.py -q                        # on a CUDA machine
    KVPREC_BENCH_SMOKE=1 python -m pytest bench/bench_sliding_window.py -q   # CPU: same KV shapes, hidden 256

Caches, in the same run: ``DynamicCache(config=...)`` (its sliding layers keep window - 1 positions),
AdaptiveCache uniform INT4 (sliding layers evict the blocks no later query can see), and the same with
``evict_sliding=False`` (every position kept, as kvprec did before eviction). Per (batch, context): the prompt is
prefilled in chunks (not timed), then ``STEPS`` one-token decode steps are timed (median, p20/p80). Cache bytes
are exact on any device, so the CPU smoke run measures them too: AdaptiveCache from its own accounting (pages,
tails, block tables), DynamicCache from the sizes of its key/value tensors. The KV shapes (layers, KV heads,
head_dim, window) are the 1B model's in both modes; the smoke run shrinks only the hidden size and vocabulary.
GPU runs are recorded as JSON under bench/results/ with each cache's ratios against DynamicCache.
"""
from __future__ import annotations


import pytest
import torch

import kvprec
from decode_timing import mode, prefill, sync, time_decode
from results_file import write_results

SMOKE, DEVICE, DTYPE = mode("sliding-window benchmarks")
CASES = [(1, 2048), (1, 8192)] if SMOKE else [(1, 8192), (8, 8192), (1, 32768)]
STEPS = 4 if SMOKE else 32
CHUNK = 512 if SMOKE else 2048
WINDOW = 512
_RESULTS: dict = {"cases": []}


def _model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    size = (dict(hidden_size=256, intermediate_size=512, vocab_size=512) if SMOKE
            else dict(hidden_size=1152, intermediate_size=6912, vocab_size=262144))
    cfg = Gemma3TextConfig(num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           sliding_window=WINDOW, query_pre_attn_scalar=256, max_position_embeddings=65536, **size)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return Gemma3ForCausalLM(cfg).to(DTYPE).eval()


@pytest.fixture(scope="module")
def model():
    m = _model()
    yield m
    if _RESULTS["cases"] and not SMOKE:
        import transformers

        _RESULTS.update({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "kvprec": kvprec.__version__,
                         "dtype": str(DTYPE), "steps": STEPS, "window": WINDOW,
                         "layer_types": m.config.layer_types})
        write_results("sliding-window", _RESULTS)


def _caches(model):
    from transformers import DynamicCache

    return {"DynamicCache(config)": lambda: DynamicCache(config=model.config),
            "kvprec uniform:int4": lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4"),
            "kvprec uniform:int4 evict_sliding=False": lambda: kvprec.AdaptiveCache(
                model.config, policy="uniform:int4", evict_sliding=False)}


def _cache_bytes(cache) -> int:
    if hasattr(cache, "memory_report"):
        return cache.memory_report().resident_bytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("cache_name", ["DynamicCache(config)", "kvprec uniform:int4",
                                        "kvprec uniform:int4 evict_sliding=False"])
@pytest.mark.parametrize("batch,context", CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_sliding_window_decode(benchmark, model, batch, context, cache_name):
    cache = _caches(model)[cache_name]()
    kvp = isinstance(cache, kvprec.AdaptiveCache)
    if not kvp:
        model.set_attn_implementation("sdpa")
    with kvprec.enabled(model) if kvp else torch.no_grad():
        token = prefill(model, cache, batch, context, CHUNK, DEVICE)
        sync(DEVICE)
        timing = time_decode(benchmark, model, cache, token, STEPS, DEVICE)
    row = {"batch": batch, "context": context, "cache": cache_name, **timing, "cache_bytes": int(_cache_bytes(cache))}
    base = next((r for r in _RESULTS["cases"] if r["cache"] == "DynamicCache(config)" and r["batch"] == batch
                 and r["context"] == context), None)
    if base is not None:  # measured in this run, just before (the first parameter)
        row["speed_vs_dynamic"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["cache_bytes_vs_dynamic"] = row["cache_bytes"] / base["cache_bytes"]
    _RESULTS["cases"].append(row)
    benchmark.extra_info.update(row)
