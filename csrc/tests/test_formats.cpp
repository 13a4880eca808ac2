// C++ tests of the storage formats: tier constants, page bytes by hand, the element error bound of the CPU
// quantizers, pack/unpack round trips, and clear errors on bad input. (Bit-exactness against the torch
// reference is checked from Python: python_tests/test_formats.py.)
#include <ATen/ATen.h>

#include "check.h"
#include "kvprec/formats.h"
#include "kvprec/quantize.h"

using namespace kvprec;

static void test_constants() {
  CHECK(tier_bits(Tier::INT4) == 4 && tier_qmax(Tier::INT4) == 15 && tier_codes_per_byte(Tier::INT2) == 4);
  CHECK_NEAR(tier_effective_bits(Tier::INT8), std::log2(255.0), 1e-12);
  CHECK(tier_effective_bits(Tier::FP16) > tier_effective_bits(Tier::BF16));
  CHECK(tier_from_name("int2") == Tier::INT2);
  CHECK_THROWS(tier_from_name("int3"), "accepted fp32, fp16, bf16, int8, int4, int2");
  CHECK_THROWS(tier_from_index(6), "is not a tier");
  // the default value group: the largest divisor of head_dim <= 64 (kvprec.storage.formats.default_group_size)
  CHECK(default_group_size(128) == 64 && default_group_size(256) == 64 && default_group_size(64) == 64);
  CHECK(default_group_size(32) == 32 && default_group_size(80) == 40 && default_group_size(96) == 48);
  CHECK(BlockGeometry{}.group_size == 64 && BlockGeometry{}.page_bytes(Tier::INT4) == 9216);
  BlockGeometry g{64, 128, 32};
  CHECK(g.page_bytes(Tier::INT4) == 9728);  // 2 * 64*128/2 + 2*2*128 + 2*2*64*4
  CHECK(g.page_bytes(Tier::FP16) == 32768);
  CHECK_THROWS((BlockGeometry{48, 128, 32}.check()), "power of two");
  CHECK_THROWS((BlockGeometry{64, 66, 2}.check()), "multiple of 4");
  CHECK_THROWS((BlockGeometry{64, 64, 24}.check()), "must divide head_dim");
}

static void test_error_bound() {
  at::manual_seed(3);
  for (Tier tier : {Tier::INT8, Tier::INT4, Tier::INT2}) {
    for (int64_t t : {1, 7, 123}) {
      at::Tensor x = at::randn({2, t, 64}) * at::linspace(0.1, 30.0, 64);
      QuantizedBlock k = quantize_keys(x, tier);
      at::Tensor err_k = (dequantize_keys(k, tier, 64, at::kFloat) - x).abs();
      at::Tensor bound_k = k.scale.to(at::kFloat).unsqueeze(1) / 2;
      // scale/2, plus FP32 rounding of the two operations (see quantize.h)
      CHECK((err_k <= bound_k + std::ldexp(1.0, -21) * (x.abs() + 2 * bound_k)).all().item<bool>());
      QuantizedBlock v = quantize_values(x, tier, 16);
      at::Tensor err_v = (dequantize_values(v, tier, 64, 16, at::kFloat) - x).abs().reshape({2, t, 4, 16});
      at::Tensor bound_v = v.scale.to(at::kFloat).unsqueeze(-1) / 2;
      CHECK((err_v <= bound_v + std::ldexp(1.0, -21) * (x.reshape({2, t, 4, 16}).abs() + 2 * bound_v)).all().item<bool>());
      CHECK(k.codes.size(2) == 64 * tier_bits(tier) / 8);
    }
  }
}

static void test_float_tiers_and_packing() {
  at::Tensor x = at::randn({1, 5, 8}).to(at::kHalf);
  QuantizedBlock f = quantize_keys(x, Tier::FP32);
  CHECK(f.codes.scalar_type() == at::kFloat && !f.scale.defined());
  CHECK(at::equal(dequantize_keys(f, Tier::FP32, 8, at::kHalf), x));
  for (Tier tier : {Tier::INT8, Tier::INT4, Tier::INT2}) {
    at::Tensor codes = at::randint(0, tier_qmax(tier) + 1, {3, 4, 16}, at::kByte);
    at::Tensor packed = pack_codes(codes, tier);
    CHECK(packed.size(-1) == 16 * tier_bits(tier) / 8);
    CHECK(at::equal(unpack_codes(packed, tier, 16), codes));
  }
}

static void test_bad_input() {
  CHECK_THROWS(quantize_keys(at::full({1, 4, 4}, 1e6), Tier::INT4), "|x| <= 65504");
  CHECK_THROWS(quantize_keys(at::full({1, 4, 4}, NAN), Tier::INT4), "finite");
  CHECK_THROWS(quantize_keys(at::zeros({4, 4}), Tier::INT4), "[N, T, D]");
  CHECK_THROWS(quantize_values(at::zeros({1, 4, 8}), Tier::INT8, 3), "group_size 3 must divide head_dim 8");
}

static void test_quantize_append() {
  // Blocks land on pages in a random order over a pool with spare pages, one block skipped (-1): each written
  // page holds what quantize_keys / quantize_values give for its block, the other pages keep their bytes, and
  // amax is max |x| over the blocks written.
  at::manual_seed(5);
  const int64_t N = 4, T = 16, D = 64, G = 16, P = 7;
  const at::Tensor x = (at::randn({N, T, D}) * 3).to(at::kHalf);
  const at::Tensor pages = at::tensor(std::vector<int64_t>{5, -1, 0, 3}, at::kLong);
  for (Tier tier : {Tier::INT8, Tier::INT4, Tier::INT2, Tier::BF16}) {
    for (bool keys : {true, false}) {
      const bool integer = tier_is_integer(tier);
      at::Tensor codes = integer ? at::randint(0, 256, {P, T, D * tier_bits(tier) / 8}, at::kByte)
                                 : at::randn({P, T, D}).to(tier_float_dtype(tier));
      const std::vector<int64_t> meta = keys ? std::vector<int64_t>{P, D} : std::vector<int64_t>{P, T, D / G};
      at::Tensor scale = integer ? at::randn(meta).to(at::kHalf) : at::Tensor();
      at::Tensor zero = integer ? at::randn(meta).to(at::kHalf) : at::Tensor();
      const at::Tensor c0 = codes.clone();
      const at::Tensor s0 = integer ? scale.clone() : at::Tensor(), z0 = integer ? zero.clone() : at::Tensor();
      at::Tensor amax = at::zeros({1});
      quantize_append(x, tier, keys, G, pages, codes, scale, zero, amax);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t pg = pages[i].item<int64_t>();
        if (pg < 0) continue;
        const at::Tensor xi = x.narrow(0, i, 1);
        const QuantizedBlock q = keys ? quantize_keys(xi, tier) : quantize_values(xi, tier, G);
        CHECK(at::equal(codes[pg], q.codes[0]));
        if (integer) CHECK(at::equal(scale[pg], q.scale[0]) && at::equal(zero[pg], q.zero[0]));
      }
      for (int64_t pg : {1, 2, 4, 6})
        CHECK(at::equal(codes[pg], c0[pg]) &&
              (!integer || (at::equal(scale[pg], s0[pg]) && at::equal(zero[pg], z0[pg]))));
      const at::Tensor live = at::cat({x[0], x[2], x[3]});
      CHECK(amax.item<float>() == live.abs().max().to(at::kFloat).item<float>());
    }
  }
  // Bad arguments name themselves, and nothing is written.
  at::Tensor codes = at::zeros({P, T, D / 2}, at::kByte);
  at::Tensor scale = at::zeros({P, D}, at::kHalf), zero = at::zeros({P, D}, at::kHalf);
  const at::Tensor amax;
  const at::Tensor far = at::tensor(std::vector<int64_t>{0, 1, 2, 9});
  CHECK_THROWS(quantize_append(x, Tier::INT4, true, G, far, codes, scale, zero, amax),
               "pages[3] (flat index) = 9 is out of range; the pool holds 7 pages");
  CHECK_THROWS(quantize_append(x, Tier::INT4, true, G, pages.narrow(0, 0, 2), codes, scale, zero, amax),
               "pages must be int32 or int64 with shape x.shape[:-2] = [4]");
  CHECK_THROWS(quantize_append(x[0], Tier::INT4, true, G, pages, codes, scale, zero, amax),
               "x must be a [..., T, D]");
  CHECK_THROWS(quantize_append(x, Tier::INT2, true, G, pages, codes, scale, zero, amax),
               "codes must be a contiguous");
  CHECK_THROWS(quantize_append(x, Tier::INT4, false, G, pages, codes, scale, zero, amax),
               "scale must be a contiguous float16 [7, 16, 4]");
  CHECK_THROWS(quantize_append(x, Tier::INT4, false, 5, pages, codes, scale, zero, amax),
               "group_size 5 must divide head_dim 64");
  CHECK_THROWS(quantize_append(x, Tier::INT4, true, G, pages, codes, scale, zero, at::zeros({2})),
               "amax must be a float32 tensor of one element");
  CHECK(codes.eq(0).all().item<bool>());
}

int main() {
  test_constants();
  test_error_bound();
  test_float_tiers_and_packing();
  test_bad_input();
  test_quantize_append();
  return kvprec_test::finish("test_formats");
}
