"""Shared by the generate benchmarks (bench_generate.py, bench_sliding_window.py): fill a cache with a prompt in
chunks (not timed on GPU; timed per chunk on the CPU), then time one-token decode steps and summarise them."""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch


def mode(what: str):
    """(smoke, device, dtype) of a generate benchmark module: CUDA + FP16, or with KVPREC_BENCH_SMOKE=1 the CPU +
    FP32 smoke run; without either the whole module is skipped (``what`` names it in the reason)."""
    smoke = os.environ.get("KVPREC_BENCH_SMOKE") == "1"
    if not smoke and not torch.cuda.is_available():
        pytest.skip(f"{what} need a CUDA device (KVPREC_BENCH_SMOKE=1 runs them on a small CPU model)",
                    allow_module_level=True)
    return smoke, ("cpu" if smoke else "cuda"), (torch.float32 if smoke else torch.float16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill(model, cache, batch: int, context: int, chunk: int, device: str) -> torch.Tensor:
    """A random prompt [batch, context] through ``model`` into ``cache`` in chunks; returns the next token [B, 1]."""
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
    for s in range(0, context, chunk):
        out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def timed_prefill(model, cache, ids: torch.Tensor, chunk: int):
    """``ids`` [B, n] through ``model`` into ``cache`` in chunks of ``chunk`` (CPU: no synchronisation needed); returns
    (next token [B, 1], seconds of each chunk)."""
    seconds = []
    for s in range(0, ids.shape[1], chunk):
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        seconds.append(time.perf_counter() - t0)
    return out.logits[:, -1].argmax(-1, keepdim=True), seconds


def timed_steps(model, cache, token: torch.Tensor, steps: int, warmup: int = 2) -> dict:
    """``warmup`` untimed then ``steps`` timed greedy decode steps on the CPU (perf_counter around each forward);
    returns median / p20 / p80 seconds (linear interpolation), every step's seconds and tokens/s (rows / median)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    median = statistics.median(times)
    return {"median_s": median, "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8)), "step_s": times,
            "tokens_per_s": token.shape[0] / median}


def time_decode(benchmark, model, cache, token: torch.Tensor, steps: int, device: str) -> dict:
    """``steps`` greedy decode steps of every row, each synchronised so the timer sees the GPU work; returns the
    median and p20 / p80 of the per-step seconds and decode tokens/s (rows / median step)."""
    state = [token]

    def step():
        out = model(input_ids=state[0], past_key_values=cache, use_cache=True, logits_to_keep=1)
        state[0] = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)

    benchmark.pedantic(step, rounds=steps, iterations=1, warmup_rounds=2)
    times = sorted(benchmark.stats.stats.data)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    median = statistics.median(times)
    return {"median_s": median, "p20_s": q(0.2), "p80_s": q(0.8), "tokens_per_s": token.shape[0] / median}
