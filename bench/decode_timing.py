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


def interleaved_cpu_runs(model, runs: list, ids: torch.Tensor, chunk: int, steps: int, warmup: int = 2) -> dict:
    """Prefill and decode several caches on the CPU in turn, so that the load of a shared machine falls on all of them
    alike: ``runs`` is a list of (name, cache, context) where ``context()`` gives the context manager a forward of that
    cache runs under (its attention implementation). Chunk i of ``ids`` [B, n] (``chunk`` tokens) goes through every
    cache before chunk i + 1, and so do the decode steps (``warmup`` untimed, then ``steps`` timed greedy steps); the
    order of the caches rotates by one each round. Each forward is timed alone (perf_counter, inside its context).

    Returns name -> {"prefill_s", "prefill_chunk_s", "median_s", "p20_s", "p80_s" (linear interpolation), "step_s",
    "tokens_per_s" (rows / median step)}."""
    chunks = {name: [] for name, _, _ in runs}
    times = {name: [] for name, _, _ in runs}
    tokens = {}

    def forward(name, cache, context, input_ids):
        with context():
            t0 = time.perf_counter()
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - t0
        tokens[name] = out.logits[:, -1].argmax(-1, keepdim=True)
        return seconds

    def rotated(i):
        return runs[i % len(runs):] + runs[:i % len(runs)]

    for i, s in enumerate(range(0, ids.shape[1], chunk)):
        for name, cache, context in rotated(i):
            chunks[name].append(forward(name, cache, context, ids[:, s:s + chunk]))
    for i in range(warmup + steps):
        for name, cache, context in rotated(i):
            seconds = forward(name, cache, context, tokens[name])
            if i >= warmup:
                times[name].append(seconds)
    out = {}
    for name, _, _ in runs:
        t = torch.tensor(times[name], dtype=torch.float64)
        median = statistics.median(times[name])
        out[name] = {"prefill_s": sum(chunks[name]), "prefill_chunk_s": chunks[name], "median_s": median,
                     "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8)), "step_s": times[name],
                     "tokens_per_s": ids.shape[0] / median}
    return out


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
