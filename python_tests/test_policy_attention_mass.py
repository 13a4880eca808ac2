"""attention_mass ranks only blocks some query has attended to: blocks with no recorded mass (right after prefill,
where the cache seals every block before the prefill's attention records any) stay heavy, so the first block,
which holds the attention sinks, is not demoted for good before the policy has seen a single attention weight."""
import pytest
import torch

import kvprec
from kvprec.hf import policy as P
from kvprec.hf.cache import AdaptiveCache
from kvprec.hf.policy.base import AttentionStats
from kvprec.storage.formats import Tier

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


class Layer:
    """The members attention_mass reads: tiers, block_size, stats (mass [B, H, n], seen [n]), set_block_tiers."""

    def __init__(self, tiers, mass, seen):
        self._tiers, self.block_size = tiers, 8
        self.stats = AttentionStats(mass.clone(), seen.clone())

    def tiers(self):
        return self._tiers

    def get_seq_length(self):
        return self._tiers.shape[-1] * self.block_size

    def set_block_tiers(self, index, tiers):
        self._tiers[..., index] = torch.where(tiers >= 0, tiers, self._tiers[..., index])


def rebalanced(mass, seen, keep=0.5):
    policy = P.attention_mass(keep=keep, high="int8", low="int4")
    layer = Layer(torch.full(mass.shape, int(Tier.INT8), dtype=torch.int8), mass, seen)
    policy.rebalance(type("Cache", (), {"layers": [layer]})(), 0)
    return layer.tiers(), policy.importance(layer)


def test_nothing_is_demoted_before_any_mass_is_recorded():
    tiers, importance = rebalanced(torch.zeros(2, 3, 6), torch.zeros(6))
    assert torch.all(tiers == Tier.INT8)  # the old ranking demoted blocks 0-2 (ties went to the newer blocks)
    # a budget demoting by importance with no mass yet takes the middle first, newer after older, block 0 last
    order = torch.argsort(importance[0, 0], stable=True).tolist()
    assert order == [1, 2, 3, 4, 5, 0]


def test_the_quota_counts_seen_blocks_only():
    # blocks 0-4 seen (block 0 the heaviest, as sinks are), block 5 and 6 not yet (e.g. sealed in the same update)
    mass = torch.tensor([[[0.6, 0.05, 0.2, 0.01, 0.1, 0.0, 0.0]]])
    seen = torch.tensor([10.0, 10, 10, 10, 10, 0, 0])
    tiers, importance = rebalanced(mass * seen, seen)
    # ceil(0.5 * 5) = 3 heavy among the seen ones: blocks 0, 2, 4; the unseen 5 and 6 stay heavy
    assert tiers[0, 0].tolist() == [Tier.INT8, Tier.INT4, Tier.INT8, Tier.INT4, Tier.INT8, Tier.INT8, Tier.INT8]
    assert torch.allclose(importance[0, 0, :5], mass[0, 0, :5]) and torch.all(importance[0, 0, 5:] > 1.0)
    # keep=1: nothing is light
    assert torch.all(rebalanced(mass * seen, seen, keep=1.0)[0] == Tier.INT8)


def test_assign_at_seal_keeps_unseen_blocks_heavy():
    policy = P.attention_mass(keep=0.25, high="fp16", low="int2")
    layer = Layer(torch.empty(1, 2, 0, dtype=torch.int8), torch.zeros(1, 2, 0), torch.zeros(0))
    stats = P.SealStats(1, 2, 8, 40, None, None, layer)
    assert torch.all(policy.assign(0, range(0, 5), stats) == Tier.FP16)


@native
def test_prefill_keeps_the_sink_block_high_then_ranks_by_mass(tiny_model):
    model = tiny_model("llama")
    policy = P.attention_mass(keep=0.5, high="int8", low="int4")
    cache = AdaptiveCache(model.config, policy=policy, block_size=8)
    ids = torch.randint(3, model.config.vocab_size, (2, 43), generator=torch.Generator().manual_seed(3))
    with kvprec.enabled(model), torch.no_grad():
        model(ids[:, :35], past_key_values=cache, use_cache=True)  # prefill: 4 blocks sealed, then attended
        for layer in cache.layers:
            assert layer.tiers().shape[-1] == 4 and torch.all(layer.tiers() == Tier.INT8)
            assert torch.all(layer.stats.seen[:4] > 0)  # the prefill's attention recorded mass on every block
        for t in range(35, 43):  # decode to 43 tokens: block 4 seals at 40, and the policy ranks the seen blocks
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        tiers, n = layer.tiers(), layer.tiers().shape[-1]
        assert n == 5
        heavy = policy._heavy(policy._scores(layer, n))
        assert torch.equal(tiers == Tier.INT8, heavy)
        assert torch.all((tiers == Tier.INT8).sum(-1) == 3)  # ceil(0.5 * 5), every block seen by now
