// MixedPrecisionBuffer: appends across block boundaries, round trips per tier, exact memory accounting,
// re-tiering with and without the shadow, crop, index_batch, reset, sliding-window eviction and argument errors.
#include <ATen/ATen.h>

#include <set>

#include "buffer_options.h"
#include "check.h"
#include "kvprec/buffer.h"
#include "kvprec/quantize.h"

using namespace kvprec;
using kvprec_test::opts;

namespace {

at::Tensor randn(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::randn(shape, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

bool same(const at::Tensor& a, const at::Tensor& b) { return a.sizes() == b.sizes() && at::equal(a, b); }

// Element bound of an integer-tier round trip (kvprec/quantize.h): |x - x'| <= scale/2, plus the FP32 rounding of
// the multiply and the add in x' = code * scale + zero (<= 2^-23 (|x| + scale) each, so 2^-22 covers both).
// k, v and x_k, x_v: [B, H, L, D] for the sealed positions of `buf` only.
bool within_quantization_bound(const MixedPrecisionBuffer& buf, Tier tier, const at::Tensor& xk, const at::Tensor& xv,
                               const at::Tensor& k, const at::Tensor& v) {
  const auto& o = buf.options();
  const int64_t B = o.batch, H = o.kv_heads, T = o.block_size, D = o.head_dim, G = o.group_size;
  const PoolView p = buf.pool(tier);
  const at::Tensor pages = buf.pages().to(at::kLong);
  for (int64_t j = 0; j < buf.num_sealed_blocks(); ++j) {
    const at::Tensor pg = pages.select(2, j).reshape({B * H});
    const at::Tensor ks = p.k_scale.index_select(0, pg).to(at::kFloat).view({B, H, 1, D});
    const at::Tensor vs = p.v_scale.index_select(0, pg).to(at::kFloat).view({B, H, T, D / G, 1})
                              .expand({B, H, T, D / G, G}).reshape({B, H, T, D});
    const at::Tensor xk_j = xk.narrow(2, j * T, T), xv_j = xv.narrow(2, j * T, T);
    const double eps = std::ldexp(1.0, -22);
    const at::Tensor ek = (k.narrow(2, j * T, T) - xk_j).abs() - (ks / 2 + eps * (xk_j.abs() + ks));
    const at::Tensor ev = (v.narrow(2, j * T, T) - xv_j).abs() - (vs / 2 + eps * (xv_j.abs() + vs));
    if (ek.max().item<float>() > 0 || ev.max().item<float>() > 0) return false;
  }
  return true;
}

void test_append_chunks() {
  // Chunks of 1, 7 and 123 tokens, so blocks fill mid-chunk, exactly at chunk ends, and several per chunk.
  for (int64_t chunk : {1, 7, 123}) {
    for (Tier tier : {Tier::FP32, Tier::FP16, Tier::INT8, Tier::INT4, Tier::INT2}) {
      const int64_t B = 2, H = 3, D = 64, T = 16, L = 200;
      const at::ScalarType dtype = tier == Tier::FP16 ? at::kHalf : at::kFloat;
      MixedPrecisionBuffer buf(opts(B, H, D, T, tier, dtype));
      const at::Tensor xk = randn({B, H, L, D}, dtype), xv = randn({B, H, L, D}, dtype);
      for (int64_t pos = 0; pos < L; pos += chunk) {
        const int64_t n = std::min(chunk, L - pos);
        CHECK(buf.blocks_sealed_by(n) == (pos + n) / T - pos / T);
        buf.append(xk.narrow(2, pos, n), xv.narrow(2, pos, n));
        CHECK(buf.seq_len() == pos + n);
        CHECK(buf.num_sealed_blocks() == (pos + n) / T);
        CHECK(buf.tail_len() == (pos + n) % T);
      }
      auto [k, v] = buf.gather(0, L);
      CHECK(k.scalar_type() == dtype && k.sizes() == xk.sizes());
      const int64_t S = buf.num_sealed_blocks() * T;
      // The tail is kept in the model dtype: always exact.
      CHECK(same(k.narrow(2, S, L - S), xk.narrow(2, S, L - S)));
      CHECK(same(buf.tail_values(), xv.narrow(2, S, L - S)));
      if (!tier_is_integer(tier)) {
        CHECK(same(k, xk));
        CHECK(same(v, xv));
      } else {
        CHECK(within_quantization_bound(buf, tier, xk, xv, k, v));
        CHECK(!same(k.narrow(2, 0, S), xk.narrow(2, 0, S)));  // it is lossy: the bound is what is promised
      }
      // Sub-ranges across block boundaries equal the same slice of the full gather.
      for (auto [a, b] : {std::pair<int64_t, int64_t>{0, 0}, {5, 37}, {16, 32}, {31, 199}, {190, 200}}) {
        auto [ks, vs] = buf.gather(a, b);
        CHECK(same(ks, k.narrow(2, a, b - a)));
        CHECK(same(vs, v.narrow(2, a, b - a)));
      }
      // tiers() / pages(): every sealed (b, h, block) at the default tier, on distinct pages.
      CHECK(buf.tiers().eq(static_cast<int8_t>(tier)).all().item<bool>());
      std::set<int32_t> distinct;
      const at::Tensor pages = buf.pages();
      for (int64_t i = 0; i < pages.numel(); ++i) distinct.insert(pages.view(-1)[i].item<int32_t>());
      CHECK(static_cast<int64_t>(distinct.size()) == B * H * buf.num_sealed_blocks());
    }
  }
}

void test_pages_bit_exact() {
  // One batched quantize per (block, tier) must give exactly what quantize_keys/values give row by row.
  const int64_t B = 3, H = 2, D = 128, T = 16, L = 37;
  for (Tier tier : {Tier::INT8, Tier::INT4, Tier::INT2}) {
    MixedPrecisionBuffer buf(opts(B, H, D, T, tier, at::kHalf));
    const at::Tensor xk = randn({B, H, L, D}, at::kHalf), xv = randn({B, H, L, D}, at::kHalf);
    buf.append(xk, xv);
    const PoolView p = buf.pool(tier);
    const at::Tensor pages = buf.pages().to(at::kLong);
    for (int64_t j = 0; j < buf.num_sealed_blocks(); ++j)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t pg = pages[b][h][j].item<int64_t>();
          const at::Tensor kb = xk[b][h].narrow(0, j * T, T).unsqueeze(0), vb = xv[b][h].narrow(0, j * T, T).unsqueeze(0);
          const QuantizedBlock qk = quantize_keys(kb, tier), qv = quantize_values(vb, tier, 32);
          CHECK(same(p.k[pg], qk.codes[0]) && same(p.k_scale[pg], qk.scale[0]) && same(p.k_zero[pg], qk.zero[0]));
          CHECK(same(p.v[pg], qv.codes[0]) && same(p.v_scale[pg], qv.scale[0]) && same(p.v_zero[pg], qv.zero[0]));
        }
  }
}

void test_memory_accounting() {
  // B=2, H=2, D=128, T=64, G=32, INT4: page = K+V codes 2*64*64 + key scale/zero 4*128 + value scale/zero 4*64*4.
  const int64_t B = 2, H = 2, D = 128, T = 64, L = 3 * 64 + 10;
  const int64_t int4_page = 2 * 64 * 64 + 4 * 128 + 4 * 64 * 4;
  const int64_t int2_page = 2 * 64 * 32 + 4 * 128 + 4 * 64 * 4;
  const int64_t fp16_page = 2 * 64 * 128 * 2;
  CHECK(int4_page == 9728);
  CHECK((BlockGeometry{T, D, 32}.page_bytes(Tier::INT4) == int4_page));

  // The shadow (needed below to promote a row to FP16) is host memory, reported apart from resident bytes.
  MixedPrecisionBuffer buf(opts(B, H, D, T, Tier::INT4, at::kHalf, /*shadow=*/true));
  MemoryReport m0 = buf.memory();
  CHECK(m0.tail_bytes == 2 * B * H * T * D * 2 && m0.resident_bytes() == m0.tail_bytes && m0.reserved_bytes == 0);
  CHECK(m0.bits_per_element() == 0.0);
  buf.append(randn({B, H, L, D}, at::kHalf), randn({B, H, L, D}, at::kHalf));
  MemoryReport m = buf.memory();
  CHECK(m.tier_pages[tier_index(Tier::INT4)] == 12);  // 3 sealed blocks x B x H
  CHECK(m.tier_bytes[tier_index(Tier::INT4)] == 12 * int4_page);
  CHECK(m.tail_bytes == 2 * 2 * 2 * 64 * 128 * 2);
  CHECK(m.table_bytes == 12 * 5);
  CHECK(m.shadow_bytes == 3 * 2 * B * H * T * D * 2);  // 2 * B * H * T * D * sizeof(half) per sealed block
  CHECK(m.reserved_bytes == 12 * int4_page);  // capacity 4 -> 8 -> 12: each block's need beats +25%
  CHECK(m.tokens == L && m.elements == B * H * L * D * 2);
  CHECK(m.resident_bytes() == 12 * int4_page + 2 * 2 * 2 * 64 * 128 * 2 + 60);
  CHECK_NEAR(m.bits_per_element(), m.resident_bytes() * 8.0 / m.elements, 1e-12);
  CHECK_NEAR(m.compression_vs_fp16(), m.elements * 2.0 / m.resident_bytes(), 1e-12);

  // Re-tier block 1: row (0, 0) to INT2, row (1, 1) to FP16. Its INT4 pages go back to the free list.
  at::Tensor t = at::full({B, H}, -1, at::kChar);
  t[0][0] = static_cast<int8_t>(Tier::INT2);
  t[1][1] = static_cast<int8_t>(Tier::FP16);
  const at::Tensor pages_before = buf.pages();
  buf.set_block_tiers(1, t);
  m = buf.memory();
  CHECK(m.tier_pages[tier_index(Tier::INT4)] == 10 && m.tier_bytes[tier_index(Tier::INT4)] == 10 * int4_page);
  CHECK(m.tier_pages[tier_index(Tier::INT2)] == 1 && m.tier_bytes[tier_index(Tier::INT2)] == int2_page);
  CHECK(m.tier_pages[tier_index(Tier::FP16)] == 1 && m.tier_bytes[tier_index(Tier::FP16)] == fp16_page);
  CHECK(m.reserved_bytes == 12 * int4_page + 1 * int2_page + 1 * fp16_page);
  // The next sealed block reuses the two free INT4 pages before taking new ones.
  buf.append(randn({B, H, T, D}, at::kHalf), randn({B, H, T, D}, at::kHalf));
  std::set<int32_t> new_pages;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) new_pages.insert(buf.pages()[b][h][3].item<int32_t>());
  CHECK(new_pages.count(pages_before[0][0][1].item<int32_t>()) == 1);
  CHECK(new_pages.count(pages_before[1][1][1].item<int32_t>()) == 1);
  CHECK(buf.memory().reserved_bytes == 15 * int4_page + int2_page + fp16_page);  // 14 needed: 12 + 12/4
  CHECK(buf.memory().shadow_bytes == 4 * 2 * B * H * T * D * 2);
}

void test_retier() {
  const int64_t B = 2, H = 2, D = 64, T = 16, L = 40;
  const at::Tensor xk = randn({B, H, L, D}), xv = randn({B, H, L, D});
  auto all = [&](Tier t) { return at::full({B, H}, static_cast<int8_t>(t), at::kChar); };

  // Without the shadow: demotion requantizes the page dequantized to FP32; promotion throws and changes nothing.
  MixedPrecisionBuffer buf(opts(B, H, D, T, Tier::INT4));
  buf.append(xk, xv);
  const auto [k4, v4] = buf.block(0, at::kFloat);
  buf.set_block_tiers(0, all(Tier::INT2));
  const auto [k2, v2] = buf.block(0, at::kFloat);
  const QuantizedBlock want_k = quantize_keys(k4.reshape({B * H, T, D}), Tier::INT2);
  const QuantizedBlock want_v = quantize_values(v4.reshape({B * H, T, D}), Tier::INT2, 32);
  CHECK(same(k2.reshape({B * H, T, D}), dequantize_keys(want_k, Tier::INT2, D, at::kFloat)));
  CHECK(same(v2.reshape({B * H, T, D}), dequantize_values(want_v, Tier::INT2, D, 32, at::kFloat)));
  CHECK(buf.tiers().select(2, 0).eq(static_cast<int8_t>(Tier::INT2)).all().item<bool>());
  CHECK(buf.tiers().select(2, 1).eq(static_cast<int8_t>(Tier::INT4)).all().item<bool>());
  CHECK_THROWS(buf.set_block_tiers(0, all(Tier::INT4)), "none is held");
  CHECK(buf.tiers().select(2, 0).eq(static_cast<int8_t>(Tier::INT2)).all().item<bool>());  // unchanged
  CHECK(same(buf.block(0, at::kFloat).first, k2));
  // -1 leaves a row as is; a same-tier request is a no-op.
  at::Tensor t = at::full({B, H}, -1, at::kChar);
  t[1][0] = static_cast<int8_t>(Tier::INT2);
  const at::Tensor pages_before = buf.pages();
  buf.set_block_tiers(0, t);
  CHECK(same(buf.pages(), pages_before));

  // With the shadow: demotion and promotion both read the exact model-dtype copy.
  MixedPrecisionBuffer sh(opts(B, H, D, T, Tier::INT4, at::kFloat, /*shadow=*/true));
  sh.append(xk, xv);
  const PoolView p4 = sh.pool(Tier::INT4);
  const at::Tensor pg = sh.pages().select(2, 1).reshape({B * H}).to(at::kLong);
  const at::Tensor codes_before = p4.k.index_select(0, pg), vscale_before = p4.v_scale.index_select(0, pg);
  sh.set_block_tiers(1, all(Tier::INT2));
  sh.set_block_tiers(1, all(Tier::INT4));  // promotion from the shadow: the same pages' bits as at sealing
  const PoolView q4 = sh.pool(Tier::INT4);
  const at::Tensor pg2 = sh.pages().select(2, 1).reshape({B * H}).to(at::kLong);
  CHECK(same(q4.k.index_select(0, pg2), codes_before));
  CHECK(same(q4.v_scale.index_select(0, pg2), vscale_before));
  sh.set_block_tiers(1, all(Tier::FP32));
  CHECK(same(sh.block(1).first, xk.narrow(2, T, T)));
  CHECK(same(sh.block(1).second, xv.narrow(2, T, T)));

  // Mixed rows: each (b, h) at its own tier, read back each at its own precision.
  at::Tensor mixed = at::empty({B, H}, at::kChar);
  const Tier order[] = {Tier::FP32, Tier::INT8, Tier::BF16, Tier::INT2};
  for (int64_t r = 0; r < B * H; ++r) mixed[r / H][r % H] = static_cast<int8_t>(order[r]);
  sh.set_block_tiers(0, mixed);
  CHECK(same(sh.tiers().select(2, 0), mixed));
  const at::Tensor k0 = sh.block(0).first;
  CHECK(same(k0[0][0], xk[0][0].narrow(0, 0, T)));
  CHECK(same(k0[1][0], xk[1][0].narrow(0, 0, T).to(at::kBFloat16).to(at::kFloat)));
  CHECK(!same(k0[1][1], xk[1][1].narrow(0, 0, T)));
}

void test_crop() {
  const int64_t B = 2, H = 2, D = 32, T = 16, L = 40;
  const at::Tensor xk = randn({B, H, L, D}), xv = randn({B, H, L, D});
  // Lossless tier: crop across a block boundary, then grow again.
  MixedPrecisionBuffer buf(opts(B, H, D, T, Tier::FP32, at::kFloat, false, 8));
  buf.append(xk, xv);
  buf.crop(100);  // past the end: no-op
  CHECK(buf.seq_len() == L);
  buf.crop(20);
  CHECK(buf.seq_len() == 20 && buf.num_sealed_blocks() == 1 && buf.tail_len() == 4);
  CHECK(buf.memory().tier_pages[tier_index(Tier::FP32)] == B * H);
  CHECK(same(buf.gather(0, 20).first, xk.narrow(2, 0, 20)));
  const at::Tensor yk = randn({B, H, 30, D}), yv = randn({B, H, 30, D});
  buf.append(yk, yv);
  CHECK(buf.seq_len() == 50 && buf.num_sealed_blocks() == 3);
  CHECK(same(buf.gather(0, 50).first, at::cat({xk.narrow(2, 0, 20), yk}, 2)));
  CHECK(same(buf.gather(0, 50).second, at::cat({xv.narrow(2, 0, 20), yv}, 2)));
  buf.crop(32);  // exactly on a block boundary: the tail is empty
  CHECK(buf.num_sealed_blocks() == 2 && buf.tail_len() == 0);
  buf.crop(0);
  CHECK(buf.seq_len() == 0 && buf.num_sealed_blocks() == 0 && buf.memory().tier_pages[0] == 0);
  CHECK_THROWS(buf.crop(-1), "crop: new_len");

  // Integer tier without the shadow: the unsealed block comes back dequantized (lossy).
  MixedPrecisionBuffer q(opts(B, H, D, T, Tier::INT4, at::kFloat, false, 8));
  q.append(xk, xv);
  const at::Tensor deq = q.block(1).first;
  q.crop(21);
  CHECK(same(q.tail_keys(), deq.narrow(2, 0, 5)));
  CHECK(!same(q.tail_keys(), xk.narrow(2, T, 5)));
  // With the shadow: exact.
  MixedPrecisionBuffer s(opts(B, H, D, T, Tier::INT4, at::kFloat, true, 8));
  s.append(xk, xv);
  s.crop(21);
  CHECK(same(s.tail_keys(), xk.narrow(2, T, 5)) && same(s.tail_values(), xv.narrow(2, T, 5)));
  CHECK(s.memory().shadow_bytes == 1 * 2 * B * H * T * D * 4);
}

void test_index_batch() {
  const int64_t B = 2, H = 2, D = 32, T = 16, L = 37;
  const at::Tensor xk = randn({B, H, L, D}), xv = randn({B, H, L, D});
  for (bool shadow : {false, true}) {
    MixedPrecisionBuffer buf(opts(B, H, D, T, Tier::INT8, at::kFloat, shadow, 8));
    buf.append(xk, xv);
    const auto [k, v] = buf.gather(0, L);
    const at::Tensor idx = at::tensor(std::vector<int64_t>{1, 1, 0}, at::kLong);
    buf.index_batch(idx);
    CHECK(buf.options().batch == 3 && buf.seq_len() == L);
    const auto [k2, v2] = buf.gather(0, L);
    CHECK(same(k2, k.index_select(0, idx)) && same(v2, v.index_select(0, idx)));
    CHECK(buf.memory().tier_pages[tier_index(Tier::INT8)] == 3 * H * 2);
    std::set<int32_t> distinct;
    const at::Tensor pages = buf.pages().view(-1);
    for (int64_t i = 0; i < pages.numel(); ++i) distinct.insert(pages[i].item<int32_t>());
    CHECK(static_cast<int64_t>(distinct.size()) == pages.numel());  // no page shared between rows
    // Demote batch row 0 of block 0: row 1 (the other copy of original row 1) does not change.
    at::Tensor t = at::full({3, H}, -1, at::kChar);
    t[0].fill_(static_cast<int8_t>(Tier::INT2));
    buf.set_block_tiers(0, t);
    const auto [k3, v3] = buf.gather(0, L);
    CHECK(same(k3[1], k[1]) && same(v3[1], v[1]) && same(k3[2], k[0]));
    CHECK(!same(k3[0], k[1]));
    if (shadow) {  // the shadow followed the reorder: promotion of row 0 restores original row 1
      t[0].fill_(static_cast<int8_t>(Tier::FP32));
      buf.set_block_tiers(0, t);
      CHECK(same(buf.block(0).first[0], xk[1].narrow(1, 0, T)));
    }
    // Subset, then append: the tail followed too (row 2 holds original row 0).
    buf.index_batch(at::tensor(std::vector<int64_t>{2}, at::kLong));
    CHECK(same(buf.tail_keys(), xk[0].narrow(1, 32, L - 32).unsqueeze(0)));
    const at::Tensor nk = randn({1, H, 20, D}), nv = randn({1, H, 20, D});
    buf.append(nk, nv);  // seals block 2 (positions 32..47); positions 48..56 stay in the tail
    CHECK(buf.num_sealed_blocks() == 3 && same(buf.tail_keys(), nk.narrow(2, 11, 9)));
    CHECK_THROWS(buf.index_batch(at::tensor(std::vector<int64_t>{1}, at::kLong)), "index_batch: idx[0]");
  }
}

void test_reset() {
  MixedPrecisionBuffer buf(opts(1, 2, 32, 16, Tier::INT4, at::kFloat, true, 8));
  buf.append(randn({1, 2, 40, 32}), randn({1, 2, 40, 32}));
  const int64_t reserved = buf.memory().reserved_bytes;
  buf.reset();
  const MemoryReport m = buf.memory();
  CHECK(buf.seq_len() == 0 && buf.num_sealed_blocks() == 0 && m.tier_pages[tier_index(Tier::INT4)] == 0);
  CHECK(m.shadow_bytes == 0 && m.table_bytes == 0 && m.reserved_bytes == reserved);
  const at::Tensor k = randn({1, 2, 20, 32});
  buf.append(k, k);
  CHECK(same(buf.tail_keys(), k.narrow(2, 16, 4)) && buf.num_sealed_blocks() == 1);
}

void test_errors() {
  CHECK_THROWS(MixedPrecisionBuffer(opts(1, 1, 30, 16, Tier::INT4)), "head_dim");
  CHECK_THROWS(MixedPrecisionBuffer(opts(1, 1, 64, 48, Tier::INT4)), "block_size");
  CHECK_THROWS(MixedPrecisionBuffer(opts(1, 1, 64, 16, Tier::INT4, at::kFloat, false, 48)), "group_size");
  CHECK_THROWS(MixedPrecisionBuffer(opts(0, 1, 64, 16, Tier::INT4)), "batch");
  CHECK_THROWS(MixedPrecisionBuffer(opts(1, 1, 64, 16, Tier::INT4, at::kInt)), "dtype");

  // group_size 0 (BufferOptions' default) takes default_group_size(head_dim)
  CHECK(MixedPrecisionBuffer(opts(1, 1, 96, 16, Tier::INT4, at::kFloat, false, 0)).options().group_size == 48);
  CHECK(MixedPrecisionBuffer(BufferOptions{}).options().group_size == 64);

  MixedPrecisionBuffer buf(opts(2, 2, 32, 16, Tier::INT4, at::kFloat, false, 8));
  const at::Tensor x = randn({2, 2, 20, 32});
  CHECK_THROWS(buf.append(randn({2, 3, 20, 32}), x), "append: k");
  CHECK_THROWS(buf.append(x, randn({2, 2, 20, 16})), "append: v");
  CHECK_THROWS(buf.append(x, x.narrow(2, 0, 19)), "same shape");
  CHECK_THROWS(buf.append(x.to(at::kInt), x), "append: k has dtype");
  CHECK_THROWS(buf.append(x, x, at::zeros({2, 2, 1}, at::kLong)), "seal_tiers: dtype");
  CHECK_THROWS(buf.append(x, x, at::zeros({2, 2, 2}, at::kChar)), "seal_tiers: shape");
  CHECK_THROWS(buf.append(x, x, at::full({2, 2, 1}, 7, at::kChar)), "seal_tiers: value 7");
  CHECK_THROWS(buf.append(x * 1e5, x), "65504");
  CHECK(buf.seq_len() == 0);  // rejected appends changed nothing
  at::Tensor st = at::full({2, 2, 1}, static_cast<int8_t>(Tier::INT8), at::kChar);
  st[1][0][0] = static_cast<int8_t>(Tier::FP16);
  buf.append(x, x, st);
  CHECK(same(buf.tiers(), st));
  CHECK_THROWS(buf.block(1), "block: index 1");
  CHECK_THROWS(buf.gather(3, 21), "gather: range");
  CHECK_THROWS(buf.set_block_tiers(-1, at::full({2, 2}, -1, at::kChar)), "set_block_tiers: index");
  CHECK_THROWS(buf.set_block_tiers(0, at::full({2, 3}, -1, at::kChar)), "set_block_tiers: tiers: shape");
  CHECK_THROWS(buf.set_block_tiers(0, at::full({2, 2}, 6, at::kChar)), "set_block_tiers: tiers: value 6");
  CHECK_THROWS(buf.index_batch(at::zeros({2}, at::kFloat)), "index_batch: idx");
  CHECK_THROWS(buf.index_batch(at::tensor(std::vector<int64_t>{0, 2}, at::kLong)), "index_batch: idx[1] = 2");
}

void test_seal_in_place() {
  // The seal quantizes straight into fresh pages and checks the FP16 range once, afterwards: a refusal gives the
  // pages back, pool growth included, so the buffer is exactly as it was.
  MixedPrecisionBuffer buf(opts(1, 2, 32, 16, Tier::INT4, at::kFloat, false, 8));
  const at::Tensor x = randn({1, 2, 100, 32});
  buf.append(x.narrow(2, 0, 20), x.narrow(2, 0, 20));
  const MemoryReport m0 = buf.memory();
  const at::Tensor pages0 = buf.pages(), tail0 = buf.tail_keys().clone(), block0 = buf.block(0).first;
  at::Tensor bad = x.narrow(2, 20, 80).clone();
  bad[0][1][50][3] = 1e6;  // in a block read straight from k (84 tokens seal 5 blocks: the pool would grow)
  CHECK_THROWS(buf.append(bad, x.narrow(2, 20, 80)), "append: k would be sealed");
  bad[0][1][50][3] = 0.0f;
  bad[0][0][2][3] = NAN;  // in the block that completes the tail
  CHECK_THROWS(buf.append(bad, x.narrow(2, 20, 80)), "append: k (with the tail keys it completes)");
  const MemoryReport m1 = buf.memory();
  CHECK(m1.reserved_bytes == m0.reserved_bytes && m1.tier_pages == m0.tier_pages && buf.seq_len() == 20);
  CHECK(same(buf.pages(), pages0) && same(buf.tail_keys(), tail0) && same(buf.block(0).first, block0));
  // A transposed input ([B, n, H, D] seen as [B, H, n, D], as Hugging Face passes it) seals as its contiguous copy.
  buf.append(x.narrow(2, 20, 80).transpose(1, 2).contiguous().transpose(1, 2), x.narrow(2, 20, 80));
  MixedPrecisionBuffer ref(opts(1, 2, 32, 16, Tier::INT4, at::kFloat, false, 8));
  ref.append(x, x);
  CHECK(same(buf.gather(0, 100).first, ref.gather(0, 100).first) && same(buf.pages(), ref.pages()));
  CHECK(buf.memory().reserved_bytes == ref.memory().reserved_bytes);
}

}  // namespace

// Sliding-window eviction: pages and shadow copies released, table entries -1, every reader refuses evicted
// positions, attention with the window it was evicted for is unchanged, and the other operations carry on.
void test_evict() {
  const int64_t B = 2, H = 2, D = 32, T = 16, L = 70, W = 20;
  const at::Tensor xk = randn({B, H, L, D}), xv = randn({B, H, L, D});
  for (bool shadow : {false, true}) {
    MixedPrecisionBuffer buf(opts(B, H, D, T, Tier::INT4, at::kFloat, shadow, 8));
    buf.append(xk, xv);  // 4 sealed blocks + 6 in the tail
    const at::Tensor q = randn({B, 2 * H, 1, D});
    AttentionOptions ao;
    ao.sliding_window = W;
    ao.block_mass = true;
    const AttentionResult before = attend(buf, q, at::Tensor(), ao);
    const MemoryReport m0 = buf.memory();
    const at::Tensor keep_k = buf.gather(48, L).first;

    buf.evict_blocks(2);
    buf.evict_blocks(1);  // fewer than already evicted: nothing changes
    CHECK(buf.evicted_blocks() == 2 && buf.num_sealed_blocks() == 4 && buf.seq_len() == L);
    const at::Tensor tiers = buf.tiers(), pages = buf.pages();
    CHECK((tiers.narrow(2, 0, 2) == kEvictedTier).all().item<bool>());
    CHECK((pages.narrow(2, 0, 2) == -1).all().item<bool>());
    CHECK((tiers.narrow(2, 2, 2) == static_cast<int8_t>(Tier::INT4)).all().item<bool>());
    const MemoryReport m1 = buf.memory();
    CHECK(m1.tier_pages[tier_index(Tier::INT4)] == m0.tier_pages[tier_index(Tier::INT4)] - 2 * B * H);
    CHECK(m1.table_bytes == m0.table_bytes);  // the entries stay (positions keep their numbering)
    CHECK(m1.elements == B * H * (L - 2 * T) * D * 2 && m1.tokens == L);
    CHECK(m1.shadow_bytes == (shadow ? 2 * 2 * B * H * T * D * 4 : 0));

    // The window keeps every query past the evicted positions: the same result, bit for bit.
    const AttentionResult after = attend(buf, q, at::Tensor(), ao);
    CHECK(same(after.out, before.out) && same(after.lse, before.lse) && same(after.block_mass, before.block_mass));
    CHECK(same(buf.gather(48, L).first, keep_k));
    ao.sliding_window = 40;  // would see position 30 (evicted)
    CHECK_THROWS(attend(buf, q, at::Tensor(), ao), "were evicted");
    ao.sliding_window = 0;
    CHECK_THROWS(attend(buf, q, at::Tensor(), ao), "were evicted");
    CHECK_THROWS(buf.block(1), "was evicted");
    CHECK_THROWS(buf.gather(20, L), "reaches evicted");
    CHECK(buf.gather(32, 40).first.size(2) == 8);
    CHECK_THROWS(buf.set_block_tiers(0, at::full({B, H}, 3, at::kChar)), "was evicted");
    buf.set_block_tiers(0, at::full({B, H}, -1, at::kChar));  // "leave as is" is accepted
    CHECK_THROWS(buf.evict_blocks(5), "evict_blocks: count");

    // Batch selection copies the live pages only; the evicted entries stay evicted.
    buf.index_batch(at::tensor(std::vector<int64_t>{1, 1, 0}, at::kLong));
    CHECK(buf.options().batch == 3 && buf.evicted_blocks() == 2);
    CHECK((buf.tiers().narrow(2, 0, 2) == kEvictedTier).all().item<bool>());
    CHECK(buf.memory().tier_pages[tier_index(Tier::INT4)] == 2 * 3 * H);
    CHECK(same(buf.gather(48, L).first.select(0, 0), keep_k.select(0, 1)));

    // Crop: inside a held block works (and un-evicts nothing); back into an evicted block throws; a whole-block
    // crop below the eviction point empties the table.
    buf.crop(60);
    CHECK(buf.seq_len() == 60 && buf.evicted_blocks() == 2 && buf.num_sealed_blocks() == 3);
    CHECK_THROWS(buf.crop(20), "were evicted");
    buf.crop(16);
    CHECK(buf.seq_len() == 16 && buf.num_sealed_blocks() == 1 && buf.evicted_blocks() == 1);
    CHECK(buf.memory().tier_pages[tier_index(Tier::INT4)] == 0);
    buf.reset();
    CHECK(buf.evicted_blocks() == 0 && buf.num_sealed_blocks() == 0);
  }
}

int main() {
  at::manual_seed(0);
  test_append_chunks();
  test_pages_bit_exact();
  test_memory_accounting();
  test_retier();
  test_crop();
  test_index_batch();
  test_reset();
  test_errors();
  test_seal_in_place();
  test_evict();
  return kvprec_test::finish("test_buffer");
}
