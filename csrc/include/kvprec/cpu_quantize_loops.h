// Internal: the inner loops of the CPU quantize_append (csrc/core/quantize.cpp) over one block's FP32 tile [T, D],
// written once as plain C++ and compiled per instruction set (csrc/core/quantize_append_<isa>.cpp, each with its
// own -m flags; the compiler vectorizes them 4, 8 or 16 lanes wide; quantize.cpp's quantize_keys / quantize_values
// use encode_one from its own baseline copy). The arithmetic is one IEEE operation at a time (every kvprec_core file
// is compiled with -ffp-contract=off and without -ffast-math), so every path writes the same codes bit for bit. Torch-free and in the includer's anonymous namespace: no inline code
// is shared between files compiled for different instruction sets.
#pragma once

#include <cstdint>

#include "kvprec/cpu_kernels.h"

namespace {

// Round half to even where it matters: every code of an in-range group has 0 <= y <= qmax (up to rounding), and
// for |y| < 2^22, (y + 1.5 * 2^23) - 1.5 * 2^23 rounds to the nearest even integer in the default rounding mode,
// exactly as std::nearbyint (a library call without SSE4.1); spelled this way it inlines and vectorizes.
inline float rne(float y) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (y + kMagic) - kMagic;
}

// The code of x in a group with FP32 zero zf and scale sf (kvprec/quantize.h): clamp(rne((x - zf) / sf), 0, qmax),
// 0 where sf == 0. The clamps are written so that a NaN becomes 0 (no undefined float -> int conversion).
inline uint8_t encode_one(float x, float zf, float sf, float qmax) {
  const float safe = sf > 0.0f ? sf : 1.0f;
  float c = rne((x - zf) / safe);
  c = c > 0.0f ? c : 0.0f;
  c = c < qmax ? c : qmax;
  return static_cast<uint8_t>(static_cast<int>(sf > 0.0f ? c : 0.0f));
}

// Keys: per-channel min / max over the t rows.
void keys_min_max(const float* tile, int64_t t, int64_t d, float* mn, float* mx) {
  for (int64_t c = 0; c < d; ++c) {
    mn[c] = __builtin_inff();
    mx[c] = -__builtin_inff();
  }
  for (int64_t r = 0; r < t; ++r) {
    const float* row = tile + r * d;
    for (int64_t c = 0; c < d; ++c) {
      mn[c] = row[c] < mn[c] ? row[c] : mn[c];
      mx[c] = row[c] > mx[c] ? row[c] : mx[c];
    }
  }
}

// Keys: codes of every row with the channel's zero / scale.
void encode_keys(const float* tile, int64_t t, int64_t d, const float* zf, const float* sf, float qmax,
                 uint8_t* codes) {
  for (int64_t r = 0; r < t; ++r) {
    const float* row = tile + r * d;
    uint8_t* out = codes + r * d;
    for (int64_t c = 0; c < d; ++c) out[c] = encode_one(row[c], zf[c], sf[c], qmax);
  }
}

// Values: codes of every (token, group of g channels) with its zero / scale ([t * d / g] each).
void encode_values(const float* tile, int64_t t, int64_t d, int64_t g, const float* zf, const float* sf, float qmax,
                   uint8_t* codes) {
  const int64_t n = t * (d / g);
  for (int64_t e = 0; e < n; ++e) {
    const float z = zf[e], s = sf[e];
    const float* x = tile + e * g;
    uint8_t* out = codes + e * g;
    for (int64_t k = 0; k < g; ++k) out[k] = encode_one(x[k], z, s, qmax);
  }
}

// PER codes per byte, little end first (element PER * j + k at bits k * 8 / PER of byte j).
template <int PER>
void pack_codes_into(const uint8_t* codes, int64_t bytes, uint8_t* out) {
  constexpr int kBits = 8 / PER;
  for (int64_t j = 0; j < bytes; ++j) {
    uint32_t byte = 0;
    for (int k = 0; k < PER; ++k) byte |= static_cast<uint32_t>(codes[j * PER + k]) << (kBits * k);
    out[j] = static_cast<uint8_t>(byte);
  }
}

void pack_codes(const uint8_t* codes, int64_t bytes, int per, uint8_t* out) {
  if (per == 2) pack_codes_into<2>(codes, bytes, out);
  else pack_codes_into<4>(codes, bytes, out);
}

constexpr kvprec::cpu::QuantizeLoops kQuantizeLoops = {&keys_min_max, &encode_keys, &encode_values, &pack_codes};

}  // namespace
