"""Precision policies: lookup by name, and what each one does to the tiers of a live cache (tiny Llama, block 8)."""
import math

import pytest
import torch

import kvprec
from kvprec.hf import policy as P
from kvprec.hf.cache import AdaptiveCache
from kvprec.storage.formats import Tier
from kvprec.hf.policy.base import AttentionStats

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def test_lookup_by_name():
    assert P.get("uniform:int4").tier is Tier.INT4
    sw = P.get("sink_window:sinks=2,window=64,rest=int2,recent=int8")
    assert (sw.sinks, sw.window, sw.rest, sw.recent) == (2, 64, Tier.INT2, Tier.INT8)
    assert P.get("attention_mass:0.25,bf16").keep == 0.25 and P.get("attention_mass:0.25,bf16").high is Tier.BF16
    policy = P.uniform("fp16")
    assert P.get(policy) is policy
    assert set(P.names()) >= {"uniform", "sink_window", "attention_mass"}


@pytest.mark.parametrize("spec,error", [
    ("h2o", "unknown policy 'h2o'; known policies: attention_mass, sink_window, uniform"),
    ("uniform:int3", "tier: 'int3' is not a tier"),
    ("budget:bits_per_element=4", "wraps another policy"),
    ("sink_window:colour=red", "bad arguments"),
    ("sink_window:window=8,4", "positional argument '4' after keyword"),
    ("sink_window:recent=int4,rest=fp16", "recent tier int4 is a lower precision"),
    ("attention_mass:keep=0", "fraction in"),
    ("attention_mass:every=-8", "every must be a whole number of tokens >= 0"),
    ("attention_mass:every=2.5", "every must be a whole number of tokens >= 0"),
])
def test_lookup_errors(spec, error):
    with pytest.raises(ValueError, match=error):
        P.get(spec)


def test_get_rejects_other_types():
    with pytest.raises(TypeError, match="Policy or a name"):
        P.get(4)


def forward(model, cache, ids):
    with kvprec.enabled(model), torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@native
def test_uniform_puts_every_block_in_its_tier(tiny_model, prompts):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:int8", block_size=8)
    forward(model, cache, prompts["padded"]["input_ids"])
    pmap = cache.memory_report().precision_map
    assert pmap[:, :, Tier.INT8].tolist() == [[4, 4], [4, 4]] and pmap.sum() == 16


@native
def test_sink_window_demotes_blocks_leaving_the_window(tiny_model, prompts):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="sink_window:sinks=4,window=8,rest=int4,recent=fp16", block_size=8)
    ids = torch.cat([prompts["single"]["input_ids"]] * 2, dim=1)  # 42 tokens
    forward(model, cache, ids[:, :21])
    # 21 tokens: block 0 holds the sinks, block 1 (8..15) overlaps the window (13, 21]
    assert cache.layers[0].tiers()[0, 0].tolist() == [Tier.FP16, Tier.FP16]
    for t in range(21, 34):  # decode one token at a time up to 34 tokens
        forward(model, cache, ids[:, t:t + 1])
    # 34 tokens, window (26, 34]: blocks 1 and 2 were sealed inside the window and have been demoted
    for layer in cache.layers:
        assert layer.tiers()[0].tolist() == [[Tier.FP16, Tier.INT4, Tier.INT4, Tier.FP16]] * 2


@native
def test_rebalance_runs_only_when_the_table_or_the_window_block_moves(tiny_model, prompts, monkeypatch):
    """A decode step that seals nothing and moves no block out of the window costs the policy a lookup
    (kvprec.hf.policy.base.needs_rebalance), yet after every step the tiers are exactly what the rule says."""
    import sys

    sw = sys.modules["kvprec.hf.policy.sink_window"]  # the package's `sink_window` attribute is the factory
    calls = []
    real = sw.demote_to
    monkeypatch.setattr(sw, "demote_to", lambda layer, targets: calls.append(1) or real(layer, targets))
    model = tiny_model("llama")
    policy = P.sink_window(sinks=4, window=8, rest="int4", recent="fp16")
    cache = AdaptiveCache(model.config, policy=policy, block_size=8)
    ids = torch.cat([prompts["single"]["input_ids"]] * 3, dim=1)  # 63 tokens
    forward(model, cache, ids[:, :21])
    for t in range(21, 61):
        forward(model, cache, ids[:, t:t + 1])
        for layer in cache.layers:
            n = layer.tiers().shape[-1]
            keep = policy._keep(torch.arange(n), 8, t + 1)
            want = torch.where(keep, int(Tier.FP16), int(Tier.INT4)).to(torch.int8)
            assert torch.equal(layer.tiers(), want.expand_as(layer.tiers()))
    # 40 steps x 2 layers = 80 updates; the window's first block moves and a block seals every 8 tokens, and
    # each change is followed by one more check: at most 3 computations per 8 tokens per layer (+ the prefill's).
    assert len(calls) <= 2 * (3 * 40 // 8 + 2) < 80


class FakeLayer:
    """The few members a policy reads (kvprec/hf/policy/base.py), with a recorded set_block_tiers."""

    def __init__(self, tiers, mean_mass):
        self._tiers, self.block_size = tiers, 8
        n = mean_mass.shape[-1]
        self.stats = AttentionStats(mean_mass.clone(), torch.ones(n))
        self.calls = []

    def tiers(self):
        return self._tiers

    def set_block_tiers(self, index, tiers):
        self.calls.append((index, tiers.tolist()))
        self._tiers[..., index] = torch.where(tiers >= 0, tiers, self._tiers[..., index])


def test_attention_mass_keeps_the_heavy_blocks():
    policy = P.attention_mass(keep=0.5, high="fp16", low="int4")
    mass = torch.tensor([[[0.5, 0.01, 0.2, 0.02, 0.3], [0.1, 0.1, 0.1, 0.1, 0.1]]])
    layer = FakeLayer(torch.full((1, 2, 5), int(Tier.FP16), dtype=torch.int8), mass)
    cache = type("Cache", (), {"layers": [layer]})()
    policy.rebalance(cache, 0)
    # ceil(0.5 * 5) = 3 heavy per head; head 1 is all ties: the newest three stay
    assert layer.tiers()[0].tolist() == [[1, 4, 1, 4, 1], [4, 4, 1, 1, 1]]
    assert [index for index, _ in layer.calls] == [0, 1, 3]
    # a block no query has seen yet (seen = 0, e.g. just after prefill) counts as heavy when it is sealed
    layer.stats.resize(6)
    stats = P.SealStats(1, 2, 8, 48, None, None, layer)
    assert policy.assign(0, range(5, 6), stats).tolist() == [[[Tier.FP16], [Tier.FP16]]]


@native
def test_attention_mass_on_a_live_cache(tiny_model, prompts):
    model = tiny_model("llama")
    policy = P.attention_mass(keep=0.5, high="fp16", low="int4")
    cache = AdaptiveCache(model.config, policy=policy, block_size=8)
    with kvprec.enabled(model):
        model.generate(**prompts["padded"], past_key_values=cache, max_new_tokens=20, do_sample=False)
    for i, layer in enumerate(cache.layers):
        policy.rebalance(cache, i)
        tiers, n = layer.tiers(), layer.tiers().shape[-1]
        heavy = policy._heavy(policy._scores(layer, n))
        assert n == 5 and torch.all((tiers == Tier.FP16) <= heavy)  # every block still at fp16 is heavy
        assert torch.all((tiers == Tier.FP16).sum(-1) <= math.ceil(0.5 * n))
        assert torch.any(tiers == Tier.INT4)


def sealed_bits(layer) -> float:
    report = layer.memory()
    b, h, n = layer.tiers().shape
    return sum(report.tier_bytes.values()) * 8 / (b * h * n * 8 * 32 * 2)


@native
def test_budget_bits_per_element_demotes_oldest_first(tiny_model, prompts):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy=P.budget("uniform:fp16", bits_per_element=9), block_size=8)
    with kvprec.enabled(model):
        model.generate(**prompts["padded"], past_key_values=cache, max_new_tokens=20, do_sample=False)
    for layer in cache.layers:
        assert sealed_bits(layer) <= 9
        tiers = layer.tiers().to(torch.int64)
        assert torch.any(tiers > Tier.FP16)
        assert torch.all(tiers[..., :-1] >= tiers[..., 1:])  # no importance given: older blocks go first


@native
def test_budget_follows_the_wrapped_policys_importance(tiny_model, prompts):
    """One prefill of 40 tokens seals 5 blocks per KV head in one update. Per block (T=8, D=32) FP16 costs 16
    bits/element, INT8 10.5, INT4 6.5, INT2 4.5 (metadata included). A 10-bit budget over 2 heads x 5 blocks
    allows 100 block-bits; all FP16 is 160, so 60 must go. The sink block 0 and the window block 4 matter most;
    in block order (head 0 before head 1 within a block), blocks 1 and 2 of both heads go to the floor (46), block
    3 of head 0 too (57.5), block 3 of head 1 one rung to INT8 (63 >= 60)."""
    model = tiny_model("llama")
    inner = P.sink_window(sinks=4, window=8, rest="fp16", recent="fp16")  # same tier: only importance differs
    cache = AdaptiveCache(model.config, policy=P.budget(inner, bits_per_element=10), block_size=8)
    forward(model, cache, torch.cat([prompts["single"]["input_ids"]] * 2, dim=1)[:, :40])
    for layer in cache.layers:
        assert layer.tiers()[0].tolist() == [[Tier.FP16, Tier.INT2, Tier.INT2, Tier.INT2, Tier.FP16],
                                             [Tier.FP16, Tier.INT2, Tier.INT2, Tier.INT8, Tier.FP16]]
        assert sealed_bits(layer) == pytest.approx(97 / 10)


@native
def test_budget_bytes_for_the_whole_cache(tiny_model, prompts):
    model = tiny_model("llama")
    kwargs = dict(**prompts["padded"], max_new_tokens=20, do_sample=False)
    int4 = AdaptiveCache(model.config, policy="uniform:int4", block_size=8)
    with kvprec.enabled(model):
        model.generate(**kwargs, past_key_values=int4)
    limit = int4.memory_report().resident_bytes  # what all-INT4 needs: reachable from FP16 by demotion
    cache = AdaptiveCache(model.config, policy=P.budget("uniform:fp16", bytes=limit), block_size=8)
    with kvprec.enabled(model):
        model.generate(**kwargs, past_key_values=cache)
    report = cache.memory_report()
    assert report.resident_bytes <= limit
    assert report.precision_map[:, :, Tier.FP16].sum() > 0  # not everything had to go


@native
def test_budget_that_cannot_be_met(tiny_model, prompts):
    model = tiny_model("llama")
    with pytest.raises(P.BudgetError, match="floor tier int2 stores 2 bits"):
        P.budget("uniform:fp16", bits_per_element=2)
    # T=8, D=32: an INT2 page is 128 data + 160 metadata bytes for 512 elements (4.5 bits/element): refused when the
    # cache is built for the model
    with pytest.raises(P.BudgetError, match="bits_per_element=4.0 cannot be met at block_size 8, head_dim 32, value "
                                            "group 32: every page at the floor tier int2 takes 4.5 bits per element"):
        AdaptiveCache(model.config, policy=P.budget("uniform:fp16", bits_per_element=4), block_size=8)
    cache = AdaptiveCache(model.config, policy=P.budget("uniform:fp16", bytes=4096), block_size=8)
    with pytest.raises(P.BudgetError, match="budget of 4096 bytes"):
        forward(model, cache, prompts["single"]["input_ids"])
    with pytest.raises(ValueError, match="exactly one of"):
        P.budget("uniform:fp16")
