"""Host cost of one AdaptiveLayer.update per policy (and with key rotation), for a decode step that seals nothing
(63 of every 64 steps at block_size 64): what each layer adds to a decode step before any kernel runs. Tiny
tensors, so the figure is Python and dispatch overhead; on CUDA it includes any device synchronisation a policy
forces.

    python -m pytest bench/bench_policy_overhead.py -q     # CPU anywhere; CUDA cases where a GPU exists

Ratios against uniform (the cheapest policy: assign only) are comparable across machines; absolute times are
the machine's. Results are printed by pytest-benchmark (not recorded: host overhead is not a GPU figure).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import kvprec
import kvprec.hf.policy as P

if not kvprec.native_available():
    pytest.skip("the native library is not built", allow_module_level=True)

#: AdaptiveCache keyword arguments per case (a function, so each case builds a fresh policy)
CASES = {
    "uniform:int4": lambda: dict(policy="uniform:int4"),
    "sink_window": lambda: dict(policy="sink_window"),
    "attention_mass": lambda: dict(policy="attention_mass"),
    "budget(uniform:fp16, 9 bits)": lambda: dict(policy=P.budget("uniform:fp16", bits_per_element=9)),
    # the key rotation's share: one [B, H_kv, 1, D] x [D, D] product per update
    "uniform:int4 key_rotation=hadamard": lambda: dict(policy="uniform:int4", key_rotation="hadamard"),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_update_overhead(benchmark, case, device):
    from transformers import LlamaConfig

    from kvprec.hf.attention import register

    register()
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    config._attn_implementation = "kvprec"  # update() returns handles, as under kvprec.enable(model)
    cache = kvprec.AdaptiveCache(config, block_size=64, **CASES[case]())
    layer = cache.layers[0]
    k = torch.randn(1, 2, 64 * 20 + 1, 32, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.update(k, k)
    one = torch.randn(1, 2, 1, 32, device=device)
    steps = 60  # stays inside one block: 1281 + 60 < 21 * 64

    def run():
        for _ in range(steps):
            layer.update(one, one)
        if device == "cuda":
            torch.cuda.synchronize()

    def reset():
        layer.crop(-(layer.get_seq_length() - (64 * 20 + 1)))
        return (), {}

    benchmark.pedantic(run, setup=reset, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["us_per_update"] = benchmark.stats.stats.median / steps * 1e6
