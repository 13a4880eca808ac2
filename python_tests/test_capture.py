"""The capture layer (kvprec/studies/platform/capture.py).

Oracles: the cache's own stored K/V (``AdaptiveLayer.gather()``: at FP32 tiers the pages hold exactly what update
received), attention recomputed densely from the captured queries and keys (for the kernel's block mass), and the
model's logits from a plain forward without any cache (for log-probabilities and entropies)."""
import numpy as np
import pytest
import torch

import kvprec
from kvprec.studies.platform.capture import Capture, CaptureSpec, Series, token_statistics

pytestmark = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")

FAMILIES = ("llama", "qwen2", "gemma2", "gpt2")


def _ids(n, seed=0):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, **kw):
    return kvprec.AdaptiveCache(model.config, policy="uniform:fp32", block_size=4, evict_sliding=False, **kw)


def _bhtd(a):
    """time-major [T, B, H, D] -> [B, H, T, D] torch"""
    return torch.from_numpy(np.asarray(a)).permute(1, 2, 0, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_the_stored_kv_at_fp32_tiers(tiny_model, family):
    model = tiny_model(family)
    capture = Capture(CaptureSpec())
    cache = capture.attach(_cache(model))
    rec = capture.generate(model, _ids(9), cache, max_new_tokens=14, do_sample=False)
    assert rec.tokens.shape == (1, 23) and rec.layers == [0, 1]
    for layer in rec.layers:
        k, v = cache.layers[layer].gather()   # 22 positions: 5 sealed blocks of 4 and the tail
        assert k.shape[2] == 22
        assert torch.equal(_bhtd(rec.keys[layer]), k) and torch.equal(_bhtd(rec.values[layer]), v)
        # prefill arrives in one update, then one position per step
        np.testing.assert_array_equal(rec.positions[layer], np.arange(22))


def test_keys_are_captured_as_the_model_gives_them_not_as_the_cache_stores_them(tiny_model):
    model = tiny_model("llama")
    capture = Capture(CaptureSpec(layers=[1]))
    cache = capture.attach(_cache(model, key_rotation="hadamard"))
    rec = capture.generate(model, _ids(7, 1), cache, max_new_tokens=9, do_sample=False)
    k, _ = cache.layers[1].gather()  # rotated on store, rotated back here: the model's keys up to FP32 rounding
    torch.testing.assert_close(_bhtd(rec.keys[1]), k, rtol=1e-5, atol=1e-5)
    stored = cache.layers[1].buffer.gather(0, 12)[0]  # what the pages hold: k R
    assert not torch.allclose(_bhtd(rec.keys[1])[:, :, :12], stored, atol=1e-3)


def test_layers_heads_and_float16_storage(tiny_model):
    model = tiny_model("qwen3")
    full = Capture(CaptureSpec(queries=True))
    ids = _ids(11, 2)
    ref = full.generate(model, ids, _cache(model), max_new_tokens=6, do_sample=False)
    part = Capture(CaptureSpec(layers=[1], heads=[1], queries=True, dtype="float16"))
    rec = part.generate(model, ids, _cache(model), max_new_tokens=6, do_sample=False)
    assert list(rec.keys) == [1] and rec.heads == [1] and rec.query_heads == [2, 3]  # GQA: 2 query heads per KV head
    assert rec.keys[1].dtype == np.float16 and rec.keys[1].shape == (16, 1, 1, 32)
    np.testing.assert_array_equal(rec.keys[1], ref.keys[1][:, :, 1:2].astype(np.float16))
    np.testing.assert_array_equal(rec.values[1], ref.values[1][:, :, 1:2].astype(np.float16))
    np.testing.assert_array_equal(rec.queries[1], ref.queries[1][:, :, 2:4].astype(np.float16))
    np.testing.assert_array_equal(rec.tokens, ref.tokens)


def test_streaming_to_disk_gives_the_same_arrays(tiny_model, tmp_path):
    model = tiny_model("llama")
    ids = _ids(13, 3)
    mem = Capture(CaptureSpec(queries=True, block_mass=True)).generate(model, ids, _cache(model), max_new_tokens=20,
                                                                        do_sample=False)
    spec = CaptureSpec(queries=True, block_mass=True, stream_dir=str(tmp_path), memory_limit_mb=0.01)
    capture = Capture(spec)
    disk = capture.generate(model, ids, _cache(model), max_new_tokens=20, do_sample=False)
    # every series went to disk (10 KiB between spills is less than the 32 steps x 2 layers x 7 series), and
    # reading it back left nothing in memory
    assert all(s.path is not None and s.memory_bytes == 0 for s in capture._series.values())
    assert isinstance(disk.keys[0], np.memmap) and len(list(tmp_path.glob("keys.0.*.bin"))) == 1
    for layer in (0, 1):
        for name in ("keys", "values", "queries", "positions", "query_positions"):
            np.testing.assert_array_equal(getattr(disk, name)[layer], getattr(mem, name)[layer])
        np.testing.assert_array_equal(disk.block_mass(layer), mem.block_mass(layer))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_queries_and_block_mass_agree_with_dense_attention(tiny_model, family):
    """The kernel's per-block mass equals softmax(q k^T / sqrt(D)) summed per block, from the captured q and k (keys
    outside a sliding layer's window masked, as the model does)."""
    from kvprec.hf.cache import sliding_windows

    model = tiny_model(family)
    capture = Capture(CaptureSpec(queries=True, block_mass=True))
    rec = capture.generate(model, _ids(10, 4), _cache(model), max_new_tokens=8, do_sample=False)
    windows = sliding_windows(model.config)
    assert family == "llama" or any(windows)  # qwen2's fixture has a sliding layer of window 12
    for layer in rec.layers:
        q = torch.from_numpy(rec.queries[layer]).double()      # [Tq, 1, Hq, D]
        k = torch.from_numpy(rec.keys[layer]).double()         # [T, 1, Hkv, D]
        qpos = rec.query_positions[layer]
        mass = rec.block_mass(layer)                           # [Tq, 1, Hq, nb]
        assert mass.shape[0] == len(qpos) == 17 and mass.shape[2] == 4
        g = q.shape[2] // k.shape[2]
        for row, p in enumerate(qpos.tolist()):
            kk = k[:p + 1, 0].repeat_interleave(g, dim=1)       # [p+1, Hq, D]
            s = (q[row, 0, :, None] * kk.transpose(0, 1)).sum(-1) / q.shape[-1] ** 0.5     # [Hq, p+1]
            if windows[layer]:
                s[:, :max(0, p + 1 - windows[layer])] = float("-inf")
            a = torch.softmax(s, -1)
            nb = -(-(p + 1) // 4)
            want = torch.nn.functional.pad(a, (0, 4 * nb - (p + 1))).reshape(a.shape[0], nb, 4).sum(-1)
            np.testing.assert_allclose(mass[row, 0, :, :nb], want.numpy(), rtol=1e-4, atol=1e-6)
            # blocks a query cannot see: 0 inside a prefill call (it reports the call's blocks), NaN after
            assert np.all((mass[row, 0, :, nb:] == 0) | np.isnan(mass[row, 0, :, nb:]))


def test_log_probabilities_and_entropies_are_the_models(tiny_model):
    """generate with sampling at temperature 2: the scorer still reports the model's own distribution (T = 1), for
    the tokens that were sampled; teacher forcing through the cache reports the same numbers."""
    model = tiny_model("llama")
    capture = Capture(CaptureSpec(layers=[0]))
    torch.manual_seed(0)
    rec = capture.generate(model, _ids(8, 5), _cache(model), max_new_tokens=12, do_sample=True, temperature=2.0,
                           top_k=0)
    with torch.no_grad():
        logits = model(torch.from_numpy(rec.tokens)).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    want_lp = logp[7:19].gather(-1, torch.from_numpy(rec.tokens[0, 8:20])[:, None])[:, 0]
    want_h = -(logp.exp() * logp).sum(-1)[7:19]
    np.testing.assert_array_equal(rec.scored_positions, np.arange(8, 20))
    np.testing.assert_allclose(rec.logprob[0], want_lp.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec.entropy[0], want_h.numpy(), rtol=1e-5, atol=1e-5)
    tf = Capture(CaptureSpec(layers=[0])).teacher_force(model, torch.from_numpy(rec.tokens), _cache(model), chunk=5)
    np.testing.assert_array_equal(tf.scored_positions, np.arange(1, 20))
    np.testing.assert_allclose(tf.logprob[0, 7:], rec.logprob[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tf.entropy[0, 7:], rec.entropy[0], rtol=1e-5, atol=1e-5)
    assert tf.keys[0].shape[0] == 20  # teacher forcing feeds every token


def test_token_statistics_by_hand():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [2.0, 0.0, 0.0]])
    logp, h = token_statistics(logits)
    assert h[0].item() == pytest.approx(np.log(2))            # two equal outcomes; the -inf one counts 0
    z = np.exp(2) + 2
    p = np.array([np.exp(2), 1, 1]) / z
    assert h[1].item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert logp[1, 0].item() == pytest.approx(np.log(p[0]), rel=1e-12)


def test_refusals_and_nothing_changes_without_attach(tiny_model):
    model = tiny_model("llama")
    cache = _cache(model)
    assert "update" not in vars(cache.layers[0]) and "attend" not in vars(cache.layers[0])
    with pytest.raises(ValueError, match="beam search"):
        Capture().generate(model, _ids(5), _cache(model), max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="out of range; the model has 2 layers"):
        Capture(CaptureSpec(layers=[2])).attach(_cache(model))
    with pytest.raises(ValueError, match="heads .* out of range"):
        Capture(CaptureSpec(heads=[5])).generate(model, _ids(5), _cache(model), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="expected a kvprec AdaptiveCache"):
        from transformers import DynamicCache
        Capture().attach(DynamicCache())
    with pytest.raises(ValueError, match="dtype"):
        CaptureSpec(dtype="bfloat16")
    with pytest.raises(ValueError, match="layers must be None or a non-empty list"):
        CaptureSpec(layers=[])
    with pytest.raises(ValueError, match="the scorer saw no step"):
        Capture().finish(torch.zeros(1, 3, dtype=torch.long))


def test_series_spill_and_read_back(tmp_path):
    s = Series(np.float32)
    s.append(np.ones((2, 3)))
    s.spill(tmp_path / "x.bin")
    s.append(np.full((1, 3), 2.0))
    a = s.array()
    assert isinstance(a, np.memmap) and a.shape == (3, 3) and a[2, 0] == 2.0
    with pytest.raises(ValueError, match="rows of shape"):
        s.append(np.ones((1, 4)))
    assert Series(np.float16).array().shape == (0,)
