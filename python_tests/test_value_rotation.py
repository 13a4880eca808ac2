"""Value rotation (AdaptiveCache(value_rotation=...), kvprec/storage/rotation.py): values stored as v S, the attention
output rotated back on every path (prefill split, block kernel, torch reference), dense reads unrotated, bytes
counted, clear refusals."""
import pytest
import torch

import kvprec
from helpers import kernel_backend_model
from kvprec.hf import prefill
from kvprec.hf.cache import AdaptiveCache
from kvprec.storage.rotation import rotation_matrix

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


def fill(model, ids, prompt_len, **cache_kwargs):
    """Prefill ids[:, :prompt_len], then decode the rest one token at a time; (logits [B, N, V], cache)."""
    cache = AdaptiveCache(model.config, block_size=8, evict_sliding=False, **cache_kwargs)
    with kvprec.enabled(model), torch.no_grad():
        logits = model(input_ids=ids[:, :prompt_len], past_key_values=cache, use_cache=True).logits
        steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                 for t in range(prompt_len, ids.shape[1])]
    return torch.cat([logits, *steps], 1), cache


# llama prefill of 300 takes the CPU prefill split (>= prefill.MIN_QUERIES queries) on backend "auto", of 19 the
# block kernel; gemma2 (softcap, sliding window) always the block kernel; gpt2 has no RoPE; "torch": the reference.
@pytest.mark.parametrize("family,prompt_len", [("llama", 300), ("llama", 19), ("gemma2", 30), ("gpt2", 300)])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fp32_tiers_attend_as_without_value_rotation(tiny_model, monkeypatch, family, prompt_len, kind, backend):
    """o S S^T = o: with FP32 tiers the logits of prefill and decode match the unrotated cache to FP32 rounding, the
    dense reads are the model's values, and what is stored is v S (the rotation is really applied)."""
    model = tiny_model(family)
    ids = torch.randint(3, 256, (2, prompt_len + 6), generator=torch.Generator().manual_seed(2))
    plain, plain_cache = fill(model, ids, prompt_len, policy="uniform:fp32", backend=backend)
    split_calls = []
    split = prefill.attend_split
    monkeypatch.setattr(prefill, "attend_split", lambda *a, **k: split_calls.append(1) or split(*a, **k))
    rotated, cache = fill(model, ids, prompt_len, policy="uniform:fp32", backend=backend, value_rotation=kind,
                          key_rotation="orthogonal")
    takes_split = backend == "auto" and family != "gemma2" and prompt_len >= prefill.MIN_QUERIES
    assert len(split_calls) == (len(cache.layers) if takes_split else 0)
    torch.testing.assert_close(rotated, plain, atol=3e-5, rtol=0)
    for layer, plain_layer in zip(cache.layers, plain_cache.layers):
        k, v = layer.gather()
        k0, v0 = plain_layer.gather()
        torch.testing.assert_close(v, v0, atol=1e-5, rtol=0)
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, v0, atol=1e-5, rtol=0)  # the dense copy transformers reads
        torch.testing.assert_close(layer.keys, k0, atol=1e-5, rtol=0)
        stored = layer.buffer.gather(0, layer.get_seq_length())[1]
        torch.testing.assert_close(stored, v0 @ layer.value_rotation, atol=1e-5, rtol=0)
        assert (stored - v0).abs().max() > 0.1


def test_dense_reads_equal_the_inputs_in_layer_0(tiny_model):
    """Layer 0's inputs do not depend on the cache: its dense values are the values the model gave, to one FP32
    rotation and back."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    _, plain = fill(model, ids, 40, policy="uniform:fp32")
    _, cache = fill(model, ids, 40, policy="uniform:fp32", value_rotation="orthogonal")
    assert torch.equal(plain.layers[0].keys, cache.layers[0].keys)  # keys untouched by value rotation
    torch.testing.assert_close(cache.layers[0].values, plain.layers[0].values, atol=2e-6, rtol=0)


def test_value_rotations_are_per_layer_reproducible_and_not_the_keys(tiny_model):
    r = rotation_matrix("orthogonal", 32, seed=3, layer_idx=1)
    s = rotation_matrix("orthogonal", 32, seed=3, layer_idx=1, stream="values")
    torch.testing.assert_close(s @ s.T, torch.eye(32), atol=2e-6, rtol=0)
    assert torch.equal(s, rotation_matrix("orthogonal", 32, seed=3, layer_idx=1, stream="values"))
    assert not torch.equal(s, r)
    assert not torch.equal(s, rotation_matrix("orthogonal", 32, seed=3, layer_idx=0, stream="values"))
    assert torch.equal(r, rotation_matrix("orthogonal", 32, seed=3, layer_idx=1))  # keys' draw unchanged
    model = tiny_model("llama")
    _, cache = fill(model, torch.randint(3, 256, (1, 12)), 12, policy="uniform:int4", key_rotation="orthogonal",
                    value_rotation="orthogonal", rotation_seed=3)
    assert torch.equal(cache.layers[1].value_rotation, s)
    assert torch.equal(cache.layers[1].rotation, r)


def test_refusals_name_the_argument(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"value_rotation: 'givens' is not accepted; use None, 'hadamard', "
                                         r"'orthogonal'"):
        AdaptiveCache(model.config, value_rotation="givens")
    with pytest.raises(ValueError, match=r"value_rotation='hadamard': head_dim 12 is not a power of two; use "
                                         r"value_rotation='orthogonal'"):
        rotation_matrix("hadamard", 12, stream="values")
    with pytest.raises(ValueError, match=r"stream 'queries' is not accepted; use 'keys', 'values'"):
        rotation_matrix("orthogonal", 12, stream="queries")
    cache = AdaptiveCache(model.config, policy="uniform:int4", block_size=8, group_size=4, value_rotation="hadamard")
    k = torch.randn(1, 2, 3, 12)
    with pytest.raises(ValueError, match=r"layer 0: value_rotation='hadamard': head_dim 12"):
        cache.update(k, k, 0)
    assert cache.layers[0].get_seq_length() == 0  # refused before anything was stored


def test_memory_report_counts_both_rotations_and_reset_drops_them(tiny_model, prompts):
    model = tiny_model("llama")
    ids = prompts["padded"]["input_ids"]
    _, plain = fill(model, ids, 21, policy="uniform:int4")
    _, keys = fill(model, ids, 21, policy="uniform:int4", key_rotation="hadamard")
    _, both = fill(model, ids, 21, policy="uniform:int4", key_rotation="hadamard", value_rotation="orthogonal")
    _, values = fill(model, ids, 21, policy="uniform:int4", value_rotation="orthogonal")
    matrix = 32 * 32 * 4
    assert both.memory_report().rotation_bytes.tolist() == [2 * matrix] * 2
    assert values.memory_report().resident_bytes == plain.memory_report().resident_bytes + 2 * matrix
    assert both.memory_report().page_bits_per_element == plain.memory_report().page_bits_per_element
    assert "8192 bytes of key rotations" in keys.memory_report().format()
    assert "16384 bytes of key and value rotations" in both.memory_report().format()
    assert "8192 bytes of value rotations" in values.memory_report().format()
    s = both.layers[0].value_rotation.clone()
    both.reset()
    assert both.layers[0].value_rotation is None
    with kvprec.enabled(model), torch.no_grad():
        model(input_ids=ids, past_key_values=both, use_cache=True)
    assert torch.equal(both.layers[0].value_rotation, s)


def test_beam_search_with_value_rotation_matches_fp32(tiny_model, prompts):
    """Rotation is below every cache operation (reorder, crop): with FP32 tiers the beams are the unrotated ones."""
    model = tiny_model("llama")
    out = []
    for rotation in (None, "orthogonal"):
        with kvprec.enabled(model):
            out.append(model.generate(**prompts["single"], max_new_tokens=12, num_beams=3, do_sample=False,
                                      past_key_values=AdaptiveCache(model.config, policy="uniform:fp32",
                                                                    block_size=8, value_rotation=rotation)))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_rotate_the_output_back(backend):
    """The Triton kernel (on CPU under TRITON_INTERPRET=1) and the CUDA kernel (fp16 on a GPU) read the stored v S and
    give o S; the layer rotates it back, so their tokens and logits are the native backend's with the same rotations,
    and with float tiers those of the same kernel over values stored as given."""

    model, ids, block_size, tol = kernel_backend_model(backend)
    out = {}
    runs = {"cpp": ("cpp", "sink_window:sinks=4,window=8,rest=int4", "orthogonal"),
            backend: (backend, "sink_window:sinks=4,window=8,rest=int4", "orthogonal"),
            "float": (backend, "uniform:fp32" if backend == "triton" else "uniform:fp16", "orthogonal"),
            "float, values as given": (backend, "uniform:fp32" if backend == "triton" else "uniform:fp16", None)}
    for name, (kernel, policy, value_rotation) in runs.items():
        cache = AdaptiveCache(model.config, policy=policy, block_size=block_size, backend=kernel,
                              key_rotation="hadamard", value_rotation=value_rotation)
        with kvprec.enabled(model):
            out[name] = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                       max_new_tokens=3, do_sample=False, pad_token_id=0,
                                       return_dict_in_generate=True, output_logits=True)
    for a, b in (("cpp", backend), ("float", "float, values as given")):
        assert torch.equal(out[a].sequences, out[b].sequences)
        for x, y in zip(out[a].logits, out[b].logits):
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)
