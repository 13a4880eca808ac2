"""layer_tiers: the named layers' blocks at ``high``, every other layer's at ``low`` (per-layer bit allocation from
examples/layer_sensitivity.py's ranking); the policy string form, refusals, and a real cache's precision map."""
import pytest
import torch

import kvprec
from kvprec.hf import policy as P
from kvprec.hf.policy import registry
from kvprec.hf.cache import AdaptiveCache
from kvprec.storage.formats import Tier


@pytest.fixture(autouse=True)
def layer_tiers_name(monkeypatch):
    """The name the example scripts register (the CLI's --policy grammar does not list it)."""
    monkeypatch.setitem(registry._FACTORIES, "layer_tiers", P.LayerTiers)


@pytest.mark.parametrize("spec, layers", [("layer_tiers:layers=0+3+7", {0, 3, 7}), ("layer_tiers:layers=5", {5}),
                                          ("layer_tiers:layers=", set()), ("layer_tiers", set())])
def test_policy_strings(spec, layers):
    policy = P.get(spec)
    assert policy.layers == layers and (policy.high, policy.low) == (Tier.INT4, Tier.INT2)
    assert P.get(policy.describe()).layers == layers  # describe() is a policy string again


@pytest.mark.parametrize("spec, error", [("layer_tiers:layers=1+x", r"layer indices joined by '\+'"),
                                         ("layer_tiers:layers=-1", "whole numbers >= 0"),
                                         ("layer_tiers:layers=1,high=int5", "'int5' is not a tier")])
def test_refusals(spec, error):
    with pytest.raises(ValueError, match=error):
        P.get(spec)
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        P.LayerTiers(layers=[1, 2.0])


@pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")
def test_cache_stores_the_named_layers_high(tiny_model):
    model = tiny_model("llama", layers=3)
    cache = AdaptiveCache(model.config, policy="layer_tiers:layers=1,high=int8,low=int4", block_size=8)
    with kvprec.enabled(model), torch.no_grad():
        model(input_ids=torch.randint(3, 256, (2, 35)), past_key_values=cache, use_cache=True)
    counts = cache.memory_report().precision_map  # [L, H_kv, tiers]: 4 sealed blocks x 2 rows per head
    assert counts[1, :, int(Tier.INT8)].tolist() == [8, 8] and counts[1].sum() == 16
    assert counts[[0, 2], :, int(Tier.INT4)].flatten().tolist() == [8] * 4 and counts[[0, 2]].sum() == 32
