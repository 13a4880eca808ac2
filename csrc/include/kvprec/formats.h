// Storage formats of kvprec: the precision tiers and their bit layouts. This header is the one source of
// truth for the constants; kvprec/storage/formats.py mirrors them and python_tests/test_formats.py checks that the
// two agree through the native extension.
//
// Torch-free: only <cstdint>, <cmath>, <string_view>.
//
// Layout of one sealed block of `block_size` (T) positions and `head_dim` (D) channels, for one KV head:
//   float tiers (FP32/FP16/BF16): K and V stored as [T, D] in the tier's dtype, no metadata.
//   integer tiers (INT8/INT4/INT2), asymmetric, codes in [0, qmax], x ~= code * scale + zero:
//     keys:   per channel within the block (KIVI: outlier channels persist), scale/zero FP16 [D];
//     values: per token, groups of `group_size` (G) along head_dim,     scale/zero FP16 [T, D/G];
//     codes packed along head_dim, little end first: INT8 one per byte [T, D],
//     INT4 two per byte [T, D/2] (element 2j in the low nibble), INT2 four per byte [T, D/4]
//     (element 4j+i at bits 2i).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kvprec {

enum class Tier : int8_t { FP32 = 0, FP16 = 1, BF16 = 2, INT8 = 3, INT4 = 4, INT2 = 5 };
constexpr int kNumTiers = 6;
constexpr Tier kAllTiers[kNumTiers] = {Tier::FP32, Tier::FP16, Tier::BF16, Tier::INT8, Tier::INT4, Tier::INT2};

constexpr int tier_index(Tier t) { return static_cast<int>(t); }

// Storage bits per element of K or V data, metadata excluded.
constexpr int tier_bits(Tier t) {
  switch (t) {
    case Tier::FP32: return 32;
    case Tier::FP16: return 16;
    case Tier::BF16: return 16;
    case Tier::INT8: return 8;
    case Tier::INT4: return 4;
    case Tier::INT2: return 2;
  }
  return 0;
}

constexpr bool tier_is_integer(Tier t) { return t == Tier::INT8 || t == Tier::INT4 || t == Tier::INT2; }

// Integer tiers: largest code, 2^bits - 1. Float tiers: 0.
constexpr int tier_qmax(Tier t) { return tier_is_integer(t) ? (1 << tier_bits(t)) - 1 : 0; }

// Integer tiers: codes per byte of packed storage. Float tiers: 0.
constexpr int tier_codes_per_byte(Tier t) { return tier_is_integer(t) ? 8 / tier_bits(t) : 0; }

// Effective precision in bits, comparable with a float's mantissa bits p (unit roundoff 2^-p):
//   float tiers: p = 24 (FP32), 11 (FP16), 8 (BF16), the mantissa with its implicit bit;
//   integer tiers: the worst-case error relative to the half-range r/2 of the quantization group is
//   (step/2) / (r/2) = 1 / qmax, so p = log2(qmax) = log2(2^b - 1): INT8 7.99, INT4 3.91, INT2 1.58.
inline double tier_effective_bits(Tier t) {
  switch (t) {
    case Tier::FP32: return 24.0;
    case Tier::FP16: return 11.0;
    case Tier::BF16: return 8.0;
    default: return std::log2(static_cast<double>(tier_qmax(t)));
  }
}

inline const char* tier_name(Tier t) {
  switch (t) {
    case Tier::FP32: return "fp32";
    case Tier::FP16: return "fp16";
    case Tier::BF16: return "bf16";
    case Tier::INT8: return "int8";
    case Tier::INT4: return "int4";
    case Tier::INT2: return "int2";
  }
  return "?";
}

inline Tier tier_from_index(int64_t i) {
  if (i < 0 || i >= kNumTiers)
    throw std::invalid_argument("tier: index " + std::to_string(i) +
                                " is not a tier; accepted 0..5 (fp32, fp16, bf16, int8, int4, int2)");
  return static_cast<Tier>(i);
}

inline Tier tier_from_name(std::string_view name) {
  for (Tier t : kAllTiers)
    if (name == tier_name(t)) return t;
  throw std::invalid_argument("tier: '" + std::string(name) +
                              "' is not a tier; accepted fp32, fp16, bf16, int8, int4, int2");
}

// Bytes of packed K (or V) data of `n` elements of one row of head_dim `d`: d * bits / 8.
constexpr int64_t tier_row_bytes(Tier t, int64_t head_dim) { return head_dim * tier_bits(t) / 8; }

// The value group used when none is given: the largest divisor of head_dim that is <= 64 (64 for head_dim 64 /
// 128 / 256, as transformers' QuantizedCache; 32 for 32, 40 for 80, 48 for 96). kvprec.storage.formats.default_group_size.
constexpr int64_t default_group_size(int64_t head_dim) {
  for (int64_t g = head_dim < 64 ? head_dim : 64; g > 1; --g)
    if (head_dim % g == 0) return g;
  return 1;
}

// Geometry of a block, checked once: head_dim divisible by 4 (INT2 packs four codes per byte) and by the
// value group size; block_size a power of two.
struct BlockGeometry {
  int64_t block_size = 64;
  int64_t head_dim = 128;
  int64_t group_size = default_group_size(128);

  void check() const {
    if (block_size <= 0 || (block_size & (block_size - 1)) != 0)
      throw std::invalid_argument("block_size: " + std::to_string(block_size) +
                                  " is not accepted; use a power of two (default 64)");
    if (head_dim <= 0 || head_dim % 4 != 0)
      throw std::invalid_argument("head_dim: " + std::to_string(head_dim) +
                                  " is not accepted; kvprec needs a positive multiple of 4 (INT2 packs 4 per byte)");
    if (group_size <= 0 || head_dim % group_size != 0)
      throw std::invalid_argument("group_size: " + std::to_string(group_size) + " must divide head_dim " +
                                  std::to_string(head_dim));
  }

  // Metadata bytes of one page: FP16 scale and zero, keys per channel [D], values per (token, group) [T, D/G].
  int64_t metadata_bytes(Tier t) const {
    if (!tier_is_integer(t)) return 0;
    return 2 * 2 * head_dim + 2 * 2 * block_size * (head_dim / group_size);
  }

  // Bytes of one page: K and V data of one block of one (batch row, KV head), plus metadata.
  int64_t page_bytes(Tier t) const { return 2 * block_size * tier_row_bytes(t, head_dim) + metadata_bytes(t); }
};

}  // namespace kvprec
