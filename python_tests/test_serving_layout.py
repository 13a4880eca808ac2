"""kvprec/serving: page-size accounting in a vLLM KV cache spec's terms and the conversion between kvprec's pools and a
vLLM-style paged layout (docs/serving.md).

Byte counts are exact (integers) against an independent formula and against a live MixedPrecisionBuffer's own memory
report; round trips are bit-exact; attention over converted-back pools is bit-identical to attention over the original
(the same codes dequantize to the same values, so the reference computes the same numbers)."""
from __future__ import annotations

import pytest
import torch

from kvprec.ops import PagedKV, decode_attention
from kvprec.serving import NULL_BLOCK, TierPageSpec, from_vllm, slot_fields, to_vllm
from kvprec.storage.buffer import MixedPrecisionBuffer
from kvprec.storage.formats import EVICTED, BlockGeometry, Tier

# (block_size T, head_dim D, value group G): awkward small sizes and a common real one.
GEOMETRIES = [(4, 12, 6), (2, 4, 4), (16, 64, None), (64, 128, 64)]


def expected_slot_bytes(t: int, d: int, g: int, tier: Tier) -> int:
    """README "Formats": K and V data at tier bits; integer tiers add FP16 scale and zero per key channel [D] and per
    value token and group [T, D/G]. Written out independently of BlockGeometry.page_bytes."""
    data = 2 * t * d * tier.bits // 8
    return data + (2 * 2 * d + 2 * 2 * t * (d // g) if tier.is_integer else 0)


@pytest.mark.parametrize("t,d,g", GEOMETRIES)
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("tier", list(Tier))
def test_page_size_bytes_per_tier(t, d, g, heads, tier):
    spec = TierPageSpec(t, heads, d, tier, g)
    g = spec.group_size
    assert spec.slot_bytes == expected_slot_bytes(t, d, g, tier) == BlockGeometry(t, d, g).page_bytes(tier)
    assert spec.page_size_bytes == heads * expected_slot_bytes(t, d, g, tier)
    assert sum(f.nbytes for f in slot_fields(spec.geometry, tier)) == spec.slot_bytes
    fields = slot_fields(spec.geometry, tier)
    assert [f.offset for f in fields] == [sum(x.nbytes for x in fields[:i]) for i in range(len(fields))]


@pytest.mark.parametrize("tier,elem", [(Tier.FP16, 2), (Tier.BF16, 2), (Tier.FP32, 4)])
def test_float_tiers_equal_vllm_attention_spec(tier, elem):
    """vLLM's AttentionSpec.real_page_size_bytes (vllm/v1/kv_cache_interface.py) is 2 * block_size * num_kv_heads *
    head_size * dtype size: a float tier's page is exactly that."""
    for t, d, g in GEOMETRIES:
        assert TierPageSpec(t, 8, d, tier, g).page_size_bytes == 2 * t * 8 * d * elem


def test_readme_page_figures():
    """README "Formats": per page at T=64, D=128, G=64: FP16 32768, INT8 17408, INT4 9216, INT2 5120 bytes."""
    want = {Tier.FP16: 32768, Tier.INT8: 17408, Tier.INT4: 9216, Tier.INT2: 5120}
    assert {t: TierPageSpec(64, 1, 128, t, 64).page_size_bytes for t in want} == want


def test_max_memory_usage_counts_the_partial_block_as_a_page():
    spec = TierPageSpec(16, 2, 64, "int4")
    assert spec.max_memory_usage_bytes(0) == 0
    assert spec.max_memory_usage_bytes(16) == spec.page_size_bytes
    assert spec.max_memory_usage_bytes(17) == 2 * spec.page_size_bytes


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=6), "block_size"), (dict(head_size=10), "head_dim"), (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=2.0), "num_kv_heads"), (dict(tier="int3"), "tier"), (dict(group_size=5), "group_size"),
    (dict(block_size=16.0), "block_size"),
])
def test_spec_refuses_bad_arguments(kwargs, match):
    args = dict(block_size=16, num_kv_heads=2, head_size=64, tier="int4", group_size=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TierPageSpec(**args)


def make_buffer(b, h, t, d, g, tiers, n, seed=0, dtype=torch.float16):
    """A buffer of n positions; ``tiers`` is one tier for every sealed block or a generator of random tier ids."""
    torch.manual_seed(seed)
    buf = MixedPrecisionBuffer(b, h, head_dim=d, block_size=t, group_size=g, dtype=dtype)
    nb = n // t
    seal = torch.randint(0, len(Tier), (b, h, nb), dtype=torch.int8) if tiers == "mixed" else tiers
    buf.append(torch.randn(b, h, n, d) * 3, torch.randn(b, h, n, d), seal_tiers=seal)
    return buf


@pytest.mark.parametrize("t,d,g", GEOMETRIES[:3])
@pytest.mark.parametrize("tier", list(Tier))
def test_uniform_tier_bytes_equal_the_buffer_report(t, d, g, tier):
    """One tier per layer (what a vLLM KV cache spec expresses): the blocks the layout hands out hold exactly the
    bytes kvprec's own memory report counts for the sealed pages, with no padding."""
    b, h, n = 2, 3, 5 * t + 1
    buf = make_buffer(b, h, t, d, g, tier, n)
    layer = to_vllm(PagedKV.from_buffer(buf))
    report = buf.memory()
    mem = layer.memory()
    assert layer.spec.tier == tier
    assert mem.block_bytes == mem.payload_bytes == sum(report.tier_bytes.values())
    assert mem.block_bytes == b * (n // t) * layer.spec.page_size_bytes
    assert mem.padding_bytes == 0
    assert mem.allocated_bytes == (1 + b * (n // t)) * layer.spec.page_size_bytes  # + the null block


@pytest.mark.parametrize("t,d,g", GEOMETRIES[:3])
def test_mixed_tiers_payload_equals_the_report_and_padding_is_the_slot_rest(t, d, g):
    b, h, n = 3, 2, 6 * t + 2
    buf = make_buffer(b, h, t, d, g, "mixed", n, seed=1)
    paged = PagedKV.from_buffer(buf)
    layer = to_vllm(paged)
    mem = layer.memory()
    geometry = BlockGeometry(t, d, layer.spec.group_size)
    assert layer.spec.tier == max((Tier(int(x)) for x in torch.unique(paged.tiers)), key=geometry.page_bytes)
    assert mem.payload_bytes == sum(buf.memory().tier_bytes.values())
    assert mem.block_bytes == b * (n // t) * h * geometry.page_bytes(layer.spec.tier)
    per_entry = [layer.spec.slot_bytes - geometry.page_bytes(Tier(int(x))) for x in paged.tiers.reshape(-1)]
    assert mem.padding_bytes == sum(per_entry) > 0


def assert_same_pages(a: PagedKV, b: PagedKV):
    """Same tier for every (b, h, j) and bit-identical codes, scales and zeros; same tail and evicted prefix."""
    assert torch.equal(a.tiers.cpu(), b.tiers.cpu()) and a.evicted_blocks == b.evicted_blocks
    assert torch.equal(a.tail_k, b.tail_k) and torch.equal(a.tail_v, b.tail_v)
    live = a.tiers.cpu() != EVICTED
    for tid in torch.unique(a.tiers.cpu()[live]).tolist():
        tier = Tier(int(tid))
        sel = a.tiers.cpu() == tid
        pa, pb = a.pages.cpu()[sel].long(), b.pages.cpu()[sel].long()
        for xa, xb in zip(a.pools[tier], b.pools[tier]):
            assert (xa is None) == (xb is None)
            if xa is not None:
                assert torch.equal(xa[pa].view(torch.uint8), xb[pb].view(torch.uint8))


@pytest.mark.parametrize("t,d,g", GEOMETRIES[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_exact_and_attention_is_unchanged(t, d, g, dtype, scalar_cpu_path):
    b, h, n = 2, 4, 7 * t + t // 2
    buf = make_buffer(b, h, t, d, g, "mixed", n, seed=2, dtype=dtype)
    paged = PagedKV.from_buffer(buf)
    # the engine's allocator hands out blocks in its own order, with free blocks between them
    gen = torch.Generator().manual_seed(3)
    nb = paged.num_blocks
    table = (1 + torch.randperm(2 * b * nb, generator=gen)[:b * nb]).to(torch.int32).reshape(b, nb)
    layer = to_vllm(paged, block_table=table, num_blocks=2 * b * nb + 1)
    back = from_vllm(layer)
    assert_same_pages(paged, back)
    again = to_vllm(back, block_table=layer.block_table, num_blocks=layer.num_blocks, slot_tier=layer.spec.tier)
    assert torch.equal(again.kv_cache, layer.kv_cache) and torch.equal(again.head_tiers, layer.head_tiers)
    assert torch.equal(again.block_table, layer.block_table)

    q = torch.randn(b, 2 * h, 3, d).to(dtype)
    for kwargs in (dict(), dict(sliding_window=2 * t), dict(softcap=5.0)):
        want = decode_attention(q, paged, backend="torch", block_mass=True, **kwargs)
        got = decode_attention(q, back, backend="torch", block_mass=True, **kwargs)
        for x, y in zip(want, got):
            assert torch.equal(x, y)
    # and the native kernel reads the converted pools as it reads the buffer
    out, lse, _ = buf.attend(q)
    out2, lse2, _ = decode_attention(q, back, backend="torch")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out2.float(), out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse2, lse, atol=1e-4, rtol=1e-5)


def test_a_slot_holds_the_page_fields_back_to_back():
    """The documented byte layout, read by hand: block_table[b, j] is the row, head h's slot starts at h * slot_bytes
    and holds K data, K scale, K zero, V data, V scale, V zero of page pages[b, h, j], then zeros."""
    buf = make_buffer(2, 3, 4, 12, 6, "mixed", 13, seed=8)
    paged = PagedKV.from_buffer(buf)
    layer = to_vllm(paged)
    slot = layer.spec.slot_bytes
    for b, h, j in [(0, 0, 0), (1, 2, 2), (0, 1, 1)]:
        tier = Tier(int(paged.tiers[b, h, j]))
        page = int(paged.pages[b, h, j])
        row = layer.kv_cache[int(layer.block_table[b, j])]
        want = torch.cat([x[page].contiguous().view(torch.uint8).reshape(-1)
                          for x in paged.pools[tier] if x is not None])
        assert torch.equal(row[h * slot:h * slot + want.numel()], want)
        assert not bool(row[h * slot + want.numel():(h + 1) * slot].any())
        assert int(layer.head_tiers[int(layer.block_table[b, j]), h]) == int(tier)


def test_pages_from_dense_in_shuffled_pools_with_spares():
    """PagedKV.from_dense lays pages out in a random order with unused pages: the layout follows the indirection."""
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 3, 37, 16, generator=gen), torch.randn(2, 3, 37, 16, generator=gen)
    tiers = torch.randint(0, len(Tier), (2, 3, 37 // 8), generator=gen).to(torch.int8)
    paged = PagedKV.from_dense(k, v, tiers, block_size=8, group_size=8, spare_pages=3, generator=gen)
    back = from_vllm(to_vllm(paged))
    assert_same_pages(paged, back)
    q = torch.randn(2, 6, 1, 16, generator=gen)
    assert torch.equal(decode_attention(q, paged, backend="torch")[0], decode_attention(q, back, backend="torch")[0])


def test_evicted_blocks_point_to_the_null_block():
    t = 4
    buf = make_buffer(2, 2, t, 8, 4, "mixed", 6 * t + 1, seed=5)
    buf.evict_blocks(2)
    paged = PagedKV.from_buffer(buf)
    layer = to_vllm(paged)
    assert bool((layer.block_table[:, :2] == NULL_BLOCK).all()) and bool((layer.block_table[:, 2:] > 0).all())
    assert bool((layer.head_tiers[NULL_BLOCK] == EVICTED).all()) and not bool(layer.kv_cache[NULL_BLOCK].any())
    assert layer.memory().payload_bytes == sum(buf.memory().tier_bytes.values())
    back = from_vllm(layer)
    assert_same_pages(paged, back)
    q = torch.randn(2, 2, 1, 8, dtype=torch.float16)
    w = 3 * t  # the window the blocks were evicted for
    assert torch.equal(decode_attention(q, paged, backend="torch", sliding_window=w)[0],
                       decode_attention(q, back, backend="torch", sliding_window=w)[0])


def test_a_shared_block_becomes_a_copy_per_request():
    """vLLM's prefix caching lets two requests point to one block; kvprec pages are never shared, so each request
    gets its own copy, with the same bytes."""
    buf = make_buffer(2, 2, 4, 8, 4, "int8", 9, seed=6)
    layer = to_vllm(PagedKV.from_buffer(buf))
    layer.block_table[1, 0] = layer.block_table[0, 0]  # request 1 reuses request 0's first block
    back = from_vllm(layer)
    k0, v0 = back.block(0)
    assert torch.equal(k0[0], k0[1]) and torch.equal(v0[0], v0[1])
    assert back.pages[0, 0, 0] != back.pages[1, 0, 0]


def test_empty_and_tail_only_layers():
    buf = make_buffer(1, 2, 8, 8, None, "int4", 5)
    layer = to_vllm(PagedKV.from_buffer(buf))
    assert layer.block_table.shape == (1, 0) and layer.num_blocks == 1 and layer.memory().block_bytes == 0
    back = from_vllm(layer)
    assert back.seq_len == 5 and torch.equal(back.tail_k, buf.tail_keys())


def layer_for_errors():
    return to_vllm(PagedKV.from_buffer(make_buffer(2, 2, 4, 8, 4, "mixed", 12, seed=7)))


def test_to_vllm_refuses_bad_arguments():
    paged = PagedKV.from_buffer(make_buffer(2, 2, 4, 8, 4, "mixed", 12, seed=7))
    present = {Tier.parse(x) for x in paged.pools}
    narrow = min(present, key=BlockGeometry(4, 8, 4).page_bytes)
    with pytest.raises(ValueError, match="slot_tier"):
        to_vllm(paged, slot_tier=narrow)
    with pytest.raises(ValueError, match=r"block_table must be int32 \[B=2, NB=3\]"):
        to_vllm(paged, block_table=torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="null block"):
        to_vllm(paged, block_table=torch.arange(6, dtype=torch.int32).reshape(2, 3))
    with pytest.raises(ValueError, match="never shared"):
        to_vllm(paged, block_table=torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_blocks"):
        to_vllm(paged, num_blocks=3)
    with pytest.raises(ValueError, match="num_blocks"):
        to_vllm(paged, num_blocks=0)


@pytest.mark.parametrize("breakage,match", [
    (lambda L: setattr(L, "kv_cache", L.kv_cache[:, 1:]), "page_size_bytes"),
    (lambda L: L.head_tiers.__setitem__((1, 0), 9), "head tier"),
    (lambda L: L.block_table.__setitem__((0, 0), 0), "null block"),
    (lambda L: L.block_table.__setitem__((0, 0), 99), "num_blocks"),
    (lambda L: setattr(L, "block_table", L.block_table.long()), "int32"),
    (lambda L: setattr(L, "tail_k", L.tail_k[:, :1]), "tail_k"),
])
def test_from_vllm_refuses_inconsistent_layouts(breakage, match):
    layer = layer_for_errors()
    breakage(layer)
    with pytest.raises(ValueError, match=match):
        from_vllm(layer)


def test_from_vllm_refuses_a_head_tier_wider_than_the_slot():
    layer = to_vllm(PagedKV.from_buffer(make_buffer(1, 2, 4, 8, 4, "int4", 8)))
    layer.head_tiers[layer.block_table[0, 0], 0] = int(Tier.FP32)
    with pytest.raises(ValueError, match="slot"):
        from_vllm(layer)


def test_the_figures_docs_serving_md_quotes():
    """docs/serving.md: page_size_bytes per tier of a Llama-3-8B-shaped layer (8 KV heads of 128, vLLM's default
    block_size 16, G = 64), and what one page size per layer costs two mixed maps over 1024 positions."""
    pages = {str(t): TierPageSpec(16, 8, 128, t).page_size_bytes for t in Tier}
    assert pages == {"fp32": 131072, "fp16": 65536, "bf16": 65536, "int8": 37888, "int4": 21504, "int2": 13312}
    k = v = torch.zeros(1, 8, 1024, 128)
    one_head_int8 = torch.full((1, 8, 64), int(Tier.INT4), dtype=torch.int8)
    one_head_int8[:, 0] = int(Tier.INT8)
    recent_fp16 = torch.full((1, 8, 64), int(Tier.INT2), dtype=torch.int8)
    recent_fp16[:, :, -4:] = int(Tier.FP16)
    got = [to_vllm(PagedKV.from_dense(k, v, tiers, block_size=16, group_size=64)).memory()
           for tiers in (one_head_int8, recent_fp16)]
    assert [(m.block_bytes, m.payload_bytes) for m in got] == [(2424832, 1507328), (4194304, 1060864)]
