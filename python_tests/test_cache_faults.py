"""AdaptiveCache and MixedPrecisionBuffer beyond the happy path: construction without a config, copies (deepcopy,
pickle, torch.save) that are exact, wrappers around the attention function, and faults that end in a clear error with
nothing lost: non-finite K/V, a forward that stops part-way, silent coercions, arguments that cannot work with the
model. FP32 models and FP32 tiers where exactness is the claim."""
import copy
import functools
import io
import pickle
import warnings

import pytest
import torch
from transformers import DynamicCache

import kvprec
from kvprec import Tier
from kvprec.hf.cache import AdaptiveCache, PartialForwardError
from kvprec.policy import BudgetError

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def forward(model, cache, ids):
    with kvprec.enabled(model), torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def lengths(cache):
    return [layer.get_seq_length() for layer in cache.layers]


# ---------------------------------------------------------------------------------------------- construction
def test_model_or_no_config_is_accepted(tiny_model, prompts):
    model = tiny_model("llama")
    assert AdaptiveCache(model).config is model.config  # the model: its config
    cache = AdaptiveCache()
    assert cache.config is None and len(cache.layers) == 0 and cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="config must be the model's config .model.config., the model itself, or None"):
        AdaptiveCache("llama")
    import transformers

    with pytest.raises(ValueError, match="does not support model_type 'opt'"):
        cache.bind(transformers.OPTConfig())  # the family check moves to the binding
    assert cache.config is None and len(cache.layers) == 0
    forward(model, cache, prompts["single"]["input_ids"])
    with pytest.raises(ValueError, match=r"holds 2 layers \(head_dim \[32\]\), the llama model 4 of head_dim 32; use "
                                         "one cache per model"):
        forward(tiny_model("llama", layers=4), cache, prompts["single"]["input_ids"])


def test_cache_without_config_or_enable_takes_the_slow_path_and_says_why(tiny_model, prompts):
    """No config and no kvprec.enable: the cache cannot tell which attention runs, so it returns tensors (as
    DynamicCache() would), grows its layers on demand, and the warning says why."""
    model = tiny_model("llama")
    kwargs = dict(**prompts["padded"], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    ref = model.generate(**kwargs, past_key_values=DynamicCache())
    cache = AdaptiveCache(policy="uniform:fp32", block_size=4)
    with pytest.warns(UserWarning, match=r"built without a config \(AdaptiveCache\(\)\) and no kvprec.enable"):
        out = model.generate(**kwargs, past_key_values=cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert [layer.keys.shape for layer in cache.layers] == [layer.keys.shape for layer in ref.past_key_values.layers]


def test_slow_path_warning_names_the_implementation(tiny_model, prompts):
    model = tiny_model("gpt2")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    with pytest.warns(UserWarning, match="its attention implementation is 'sdpa'"), torch.no_grad():
        model(**prompts["single"], past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------- dense views
def test_keys_and_values_are_a_cached_dense_copy(tiny_model, prompts):
    model, ids = tiny_model("llama"), prompts["single"]["input_ids"]
    cache = AdaptiveCache(model.config, policy="uniform:int4", block_size=4, key_rotation="orthogonal")
    assert cache.layers[0].keys is None and cache.layers[0].values is None  # before the first update
    forward(model, cache, ids)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=ref, use_cache=True)
    layer = cache.layers[0]
    k = layer.keys
    assert k is layer.keys and layer.values is layer.values  # built once, reused until the layer changes
    assert k.shape == ref.layers[0].keys.shape and k.dtype == torch.float32
    # Rotation undone: the tail (positions 20..) holds the model's keys up to one FP32 rotation and back.
    torch.testing.assert_close(k[:, :, 20:], ref.layers[0].keys[:, :, 20:], rtol=0, atol=1e-5)
    gathered = layer.gather()[0].clone()
    k.zero_()  # a copy: the storage does not change
    assert torch.equal(layer.gather()[0], gathered)
    with pytest.raises(AttributeError, match="read-only dense copy"):
        layer.keys = torch.zeros(1)
    forward(model, cache, ids[:, :1])
    assert layer.keys is not k and layer.keys.shape[2] == 22
    cache.crop(-3)
    assert layer.keys.shape[2] == 19


# ---------------------------------------------------------------------------------------------- copies
def _filled_buffer(shadow: bool):
    """A buffer with every tier, a re-tiered block, an evicted prefix and a 3-position tail."""
    g = torch.Generator().manual_seed(0)
    buf = kvprec.MixedPrecisionBuffer(batch=2, kv_heads=3, head_dim=32, block_size=4, dtype=torch.float32,
                                      shadow=shadow)
    tiers = torch.arange(2 * 3 * 5, dtype=torch.int8).reshape(2, 3, 5) % 6
    buf.append(torch.randn(2, 3, 23, 32, generator=g), torch.randn(2, 3, 23, 32, generator=g), tiers)
    buf.set_block_tiers(3, Tier.INT2)
    buf.evict_blocks(1)
    return buf


def _copies():
    def through_torch_save(obj):
        f = io.BytesIO()
        torch.save(obj, f)
        f.seek(0)
        return torch.load(f, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
            "torch.save": through_torch_save}


def _same_memory(a, b):
    a, b = a.memory(), b.memory()
    assert (a.tier_bytes, a.tier_pages, a.tail_bytes, a.table_bytes, a.shadow_bytes, a.tokens, a.elements) == \
        (b.tier_bytes, b.tier_pages, b.tail_bytes, b.table_bytes, b.shadow_bytes, b.tokens, b.elements)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("shadow", [False, True])
def test_buffer_copies_are_exact(how, shadow):
    buf = _filled_buffer(shadow)
    clone = _copies()[how](buf)
    assert torch.equal(clone.tiers(), buf.tiers()) and clone.evicted_blocks == 1 and clone.seq_len == 23
    _same_memory(clone, buf)
    for a, b in zip(clone.gather(4), buf.gather(4)):
        assert torch.equal(a, b)
    q = torch.randn(2, 6, 3, 32, generator=torch.Generator().manual_seed(1))
    for a, b in zip(clone.attend(q, sliding_window=12, block_mass=True), buf.attend(q, sliding_window=12,
                                                                                    block_mass=True)):
        assert torch.equal(a, b)
    clone.append(torch.ones(2, 3, 1, 32), torch.ones(2, 3, 1, 32))  # independent: the original is untouched
    assert buf.seq_len == 23 and clone.seq_len == 24
    if shadow:  # the shadow came along: an exact crop and a promotion read the values the blocks were sealed from
        for b in (buf, clone):
            b.crop(18)
            b.set_block_tiers(2, Tier.FP32)
        for a, b in zip(clone.gather(4), buf.gather(4)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_cache_copies_are_exact(tiny_model, prompts, how):
    """A filled cache (mixed tiers from a budget, rotated keys, a sliding layer that evicted, attention-mass stats)
    and its copy give the same memory report and, decoding on, the same logits bit for bit; the original is not
    touched by the copy's steps."""
    model, ids = tiny_model("mistral"), prompts["padded"]["input_ids"]
    ids = torch.cat([ids, ids], 1)  # 42 positions: past the window of 12, so the sliding layer evicts
    policy = kvprec.policy.budget("attention_mass:keep=0.5,high=fp16,low=int4", bits_per_element=9)
    cache = AdaptiveCache(model.config, policy=policy, block_size=4, key_rotation="orthogonal", shadow="cpu")
    forward(model, cache, ids)
    forward(model, cache, ids[:, -1:])  # eviction runs before an append: this step drops what the window passed
    assert cache.layers[0].evicted_blocks > 0 and len(set(cache.layers[0].tiers().flatten().tolist())) > 2
    clone = _copies()[how](cache)
    assert str(clone.memory_report()) == str(cache.memory_report())
    step = ids[:, -1:]
    for _ in range(3):
        a, b = forward(model, cache, step), forward(model, clone, step)
        assert torch.equal(a, b)
        step = a[:, -1:].argmax(-1)
    assert str(clone.memory_report()) == str(cache.memory_report())
    forward(model, clone, step)
    assert clone.get_seq_length() == cache.get_seq_length() + 1


def test_deepcopy_reuses_a_prompt_cache(tiny_model, prompts):
    """transformers' documented prompt reuse: fill a cache with a prompt once, deep-copy it for each continuation.
    The copy shares the model's config, so it takes the fast path at once."""
    model = tiny_model("llama")
    prompt = prompts["single"]["input_ids"]
    prompt_cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    forward(model, prompt_cache, prompt)
    for extra in ([5, 6, 7], [9]):
        ids = torch.cat([prompt, torch.tensor([extra])], 1)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        ref = model.generate(**kwargs, past_key_values=DynamicCache(config=model.config))
        reused = copy.deepcopy(prompt_cache)
        assert reused.config is model.config
        with kvprec.enabled(model), warnings.catch_warnings():
            warnings.simplefilter("error")  # no slow-path warning
            out = model.generate(**kwargs, past_key_values=reused)
        assert torch.equal(out, ref)
    assert prompt_cache.get_seq_length() == prompt.shape[1]


def test_unpickled_cache_is_bound_again_by_enable(tiny_model, prompts):
    model, ids = tiny_model("llama"), prompts["single"]["input_ids"]
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    forward(model, cache, ids)
    clone = pickle.loads(pickle.dumps(cache))
    assert "unpickled with a copy" in clone.attention_mismatch()
    with kvprec.enabled(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-path warning: the hook binds it back before the first update
        model(input_ids=ids[:, :1], past_key_values=clone, use_cache=True)
        assert clone.config is model.config and clone.attention_mismatch() is None


# ---------------------------------------------------------------------------------------------- wrappers
@pytest.fixture
def restore_registration():
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvprec.hf.attention import kvprec_attention_forward, register

    register()
    yield ALL_ATTENTION_FUNCTIONS["kvprec"]
    AttentionInterface.register("kvprec", kvprec_attention_forward)


def test_a_functools_wrapper_keeps_the_fast_path(tiny_model, prompts, restore_registration):
    from transformers import AttentionInterface

    calls = []

    @functools.wraps(restore_registration)
    def profiled(*args, **kwargs):
        calls.append(1)
        return restore_registration(*args, **kwargs)

    AttentionInterface.register("kvprec", profiled)
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-path warning: updates return handles
        forward(model, cache, prompts["single"]["input_ids"])
    assert len(calls) == 2  # the wrapper ran, and kvprec.enable kept it registered


def test_a_wrapper_without_wraps_is_named_in_the_warning(tiny_model, prompts, restore_registration):
    from transformers import AttentionInterface

    def traced(*args, **kwargs):
        return restore_registration(*args, **kwargs)

    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    with kvprec.enabled(model), torch.no_grad():
        AttentionInterface.register("kvprec", traced)  # after enable, which would have put kvprec's own back
        with pytest.warns(UserWarning, match=r"maps 'kvprec' to .*traced, which is not kvprec's attention function "
                                             r"nor a wrapper of it that keeps __wrapped__"):
            model(input_ids=prompts["single"]["input_ids"], past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------- faults
@pytest.mark.filterwarnings("ignore:kvprec.AdaptiveCache. the model is not using")  # direct updates: no model
@pytest.mark.parametrize("which,value", [("key", float("nan")), ("value", float("inf"))])
def test_non_finite_kv_refused_at_its_append(tiny_model, which, value):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:int4", block_size=4)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 6, 32, generator=g), torch.randn(1, 2, 6, 32, generator=g)
    cache.update(k, v, 0)
    cache.update(k, v, 1)
    before = [t.clone() for t in cache.layers[1].gather()]
    bad = [torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)]
    bad[0 if which == "key" else 1][0, 1, 0, 5] = value
    cache.update(k[:, :, :1], v[:, :, :1], 0)
    with pytest.raises(ValueError, match=rf"layer 1: the {which} at position 6 \(batch row 0, KV head 1, channel 5\) "
                                         rf"is {value}; nothing of this update was stored"):
        cache.update(*bad, 1)
    assert lengths(cache) == [7, 6]
    assert all(torch.equal(a, b) for a, b in zip(cache.layers[1].gather(), before))


def test_a_forward_that_stops_part_way_is_detected(tiny_model, prompts, monkeypatch):
    """Layer 2 of 4 fails in the middle of a decode step: layers 0 and 1 already hold the token. The next forward is
    refused before it stores anything, naming the lengths and the recovery; crop_to_shortest() undoes the failed
    step exactly (FP32 tiers), after which decoding matches a cache that never failed."""
    model = tiny_model("llama", layers=4)
    ids = prompts["single"]["input_ids"]
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    clean = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    forward(model, cache, ids[:, :20])
    forward(model, clean, ids[:, :20])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(cache.layers[2], "update", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        forward(model, cache, ids[:, 20:21])
    monkeypatch.undo()
    assert lengths(cache) == [21, 21, 20, 20]
    with pytest.raises(PartialForwardError, match=r"different numbers of positions \[21, 21, 20, 20\].*Nothing of this "
                                                  r"forward was stored.*cache.crop_to_shortest\(\).*cache.reset\(\)"):
        forward(model, cache, ids[:, 20:21])
    assert lengths(cache) == [21, 21, 20, 20]
    assert cache.crop_to_shortest() == 20
    assert torch.equal(forward(model, cache, ids[:, 20:21]), forward(model, clean, ids[:, 20:21]))


def test_a_failure_between_layers_is_detected(tiny_model, prompts):
    """An exception raised by the model between two layers' updates (here a hook on layer 1's MLP) never reaches the
    cache; the next forward sees the lengths differ."""
    model = tiny_model("llama", layers=4)
    ids = prompts["single"]["input_ids"]
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    forward(model, cache, ids[:, :10])

    def fail(*args):
        raise RuntimeError("hook failed")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="hook failed"):
            forward(model, cache, ids[:, 10:12])
    finally:
        handle.remove()
    assert lengths(cache) == [12, 12, 10, 10]
    with pytest.raises(PartialForwardError, match=r"\[12, 12, 10, 10\]"):
        forward(model, cache, ids[:, 10:12])
    cache.reset()
    forward(model, cache, ids[:, :3])
    assert lengths(cache) == [3, 3, 3, 3]


def test_layers_grown_on_demand_are_checked_too(tiny_model, prompts):
    """AdaptiveCache() without kvprec.enable grows layers as the model reaches them: when the first forward dies
    before layer 1 exists, the next forward is refused at layer 1 (the message says which layers it reached)."""
    model = tiny_model("llama")
    ids = prompts["single"]["input_ids"]
    cache = AdaptiveCache(policy="uniform:fp32", block_size=4)

    def fail(*args):
        raise RuntimeError("hook failed")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    try:
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="hook failed"):
            warnings.simplefilter("ignore")  # the slow path of an unbound cache
            model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    finally:
        handle.remove()
    assert lengths(cache) == [5]
    with warnings.catch_warnings(), pytest.raises(PartialForwardError, match=r"layers 0..0 and is refused at layer 1"):
        warnings.simplefilter("ignore")
        model(input_ids=ids[:, 5:6], past_key_values=cache, use_cache=True)
    assert cache.crop_to_shortest() == 0


# ---------------------------------------------------------------------------------------------- coercions
def test_batch_operations_refuse_what_they_would_coerce(tiny_model, prompts):
    model = tiny_model("llama")
    cache = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    forward(model, cache, prompts["padded"]["input_ids"])
    with pytest.raises(ValueError, match=r"reorder_cache\(beam_idx\): expected integer row indices"):
        cache.reorder_cache(torch.tensor([1.7, 0.2]))
    with pytest.raises(ValueError, match=r"batch_select_indices\(indices\): a bool mask is not accepted"):
        cache.batch_select_indices(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"row indices \[0, 2\] are not accepted; the cache holds rows 0..1"):
        cache.batch_select_indices(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1"):
        cache.batch_repeat_interleave(2.0)
    assert [layer.rows for layer in cache.layers] == [2, 2]
    cache.batch_select_indices([1])
    assert [layer.rows for layer in cache.layers] == [1, 1]


@pytest.mark.parametrize("make,error", [
    (lambda: kvprec.policy.get("sink_window:window=12.5"), "window must be a whole number of tokens, got 12.5"),
    (lambda: kvprec.policy.SinkWindow(window=True), "window must be a whole number of tokens, got True"),
    (lambda: kvprec.policy.get("sink_window:window=8,window=9"), "'window' is given twice"),
    (lambda: kvprec.policy.get("sink_window:8,sinks=3"), "multiple values for argument 'sinks'"),
    (lambda: kvprec.policy.get("uniform:1"), "tier=1: a tier in a policy string is a name"),
    (lambda: kvprec.policy.get("sink_window:rest=4"), "rest=4: a tier in a policy string is a name"),
    (lambda: kvprec.policy.Uniform(True), "uniform: True is not a tier"),
    (lambda: kvprec.policy.AttentionMass(keep=True), "attention_mass: keep: True is not accepted"),
    (lambda: kvprec.policy.budget("uniform:fp16", bits_per_element="4"), "bits_per_element: '4' is not accepted"),
    (lambda: kvprec.policy.budget("uniform:fp16", bytes=1e6), "bytes must be a positive whole number"),
])
def test_policies_refuse_what_they_would_coerce(make, error):
    with pytest.raises(ValueError, match=error):
        make()


@pytest.mark.parametrize("kwargs,error", [
    (dict(block_size=64.0), r"block_size 64.0 is not accepted; expected a power of two from 1 to 1024 \(an int\)"),
    (dict(block_size="64"), r"block_size '64' is not accepted"),
    (dict(block_size=2 ** 20), r"block_size 1048576 is not accepted; expected a power of two from 1 to 1024"),
    (dict(group_size=16.0), "group_size: 16.0 is not accepted; expected a whole number >= 1"),
    (dict(rotation_seed=0.5), "rotation_seed: 0.5 is not accepted"),
    (dict(evict_sliding="no"), "evict_sliding must be True or False"),
])
def test_cache_arguments_are_not_coerced(tiny_model, kwargs, error):
    with pytest.raises(ValueError, match=error):
        AdaptiveCache(tiny_model("llama").config, **kwargs)


# ---------------------------------------------------------------------------------------------- construction checks
def test_what_needs_the_model_is_checked_at_construction(tiny_model, prompts):
    config = tiny_model("llama").config  # head_dim 32
    with pytest.raises(ValueError, match=r"AdaptiveCache \(head_dim 32\): group_size: 24 must divide head_dim 32"):
        AdaptiveCache(config, group_size=24)
    # INT2 pages at T=4, D=32, G=32: 2 bits + 16/4 (key scale and zero per channel) + 16/32 (values) = 6.5
    with pytest.raises(BudgetError, match="bits_per_element=6.0 cannot be met at block_size 4, head_dim 32, value "
                                          "group 32: every page at the floor tier int2 takes 6.5 bits per element"):
        AdaptiveCache(config, policy=kvprec.policy.budget("uniform:int4", bits_per_element=6.0), block_size=4)
    AdaptiveCache(config, policy=kvprec.policy.budget("uniform:int4", bits_per_element=6.5), block_size=4)
    assert AdaptiveCache(config, block_size=1024).block_size == 1024
    # without a config, the same checks run when kvprec.enable binds the cache to the model
    model = tiny_model("llama")
    unbound = AdaptiveCache(policy=kvprec.policy.budget("uniform:int4", bits_per_element=6.0), block_size=4)
    with pytest.raises(BudgetError, match="cannot be met at block_size 4"):
        forward(model, unbound, prompts["single"]["input_ids"])
    assert unbound.get_seq_length() == 0


def test_hadamard_and_triton_are_checked_against_the_model(tiny_model, monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    with pytest.raises(ValueError, match="key_rotation='hadamard': head_dim 24 is not a power of two"):
        AdaptiveCache(config, key_rotation="hadamard")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'triton' cannot run here: (the triton package is not installed|"
                                             "there is no CUDA device)"):
            AdaptiveCache(tiny_model("llama").config, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(ValueError, match="backend 'triton' takes head_dim 64, 128, 256, not 32"):
            AdaptiveCache(tiny_model("llama").config, backend="triton")
