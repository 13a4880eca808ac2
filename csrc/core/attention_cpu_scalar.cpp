// The scalar path of the CPU attention kernels (kvprec/cpu_kernels.h), compiled for the baseline ISA: every block is
// converted to FP32 rows first (integer pages dequantized with the formula of kvprec/formats.py,
// x' = clamp(code * scale + zero, -65504, 65504), two roundings: this file is compiled with -ffp-contract=off), then
// scored and summed in FP32. The reference the SIMD paths are tested against, and their fallback for pages whose
// scale / zero could reach the clamp.
//
// Inner loops are plain C++ that GCC vectorizes at -O3 for the baseline ISA (no -march): register blocks of fixed
// size (RB rows x kKeys positions x kLanes channels for scores, RB rows x kVec channels for p v), reductions kept
// in independent lanes (an in-order float reduction does not vectorize without -ffast-math), and selects written
// on bit patterns where a float ternary would leave control flow in the loop.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kvprec/cpu_exp_poly.h"
#include "kvprec/cpu_kernels.h"

namespace kvprec::cpu {
namespace {

constexpr float kFp16Max = 65504.0f;
constexpr int kVec = 8;    // channels per register block of p v; lanes of a max / sum over positions
constexpr int kLanes = 4;  // partial sums of a score (along channels; head_dim is a multiple of 4)
constexpr int kKeys = 2;   // positions per register block of scores
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// c ? a : b on bit patterns: branch-free, so that loops around it vectorize (GCC keeps a float ternary followed by
// more arithmetic as control flow under its default -ftrapping-math).
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & m) | (std::bit_cast<uint32_t>(b) & ~m));
}

// e^x for x <= 0 (a score minus a running max), -inf -> 0, NaN -> NaN. Cephes expf: x = n ln2 + r with ln2 in two
// parts, |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n through the exponent bits; below ln(FLT_MIN) it returns
// 0 (no subnormals). Checked over every float in [-87.34, 0] against exp in double: at most 0.98 ulp (libm's expf:
// 0.5; ATen's Sleef expf_u10: 1). e^0 = 1 exactly. The SIMD paths evaluate the same polynomial.
inline float exp_nonpositive(float x) {
  namespace ep = exp_poly;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (v + kRound) - kRound rounds v to the nearest integer
  const bool under = x < ep::kMin;
  const float xc = select(under, ep::kMin, x);
  float n = (xc * ep::kLog2e + kRound) - kRound;
  n = select(n < ep::kMinExponent, ep::kMinExponent, n);  // also keeps a NaN out of the integer conversion
  n = select(n > ep::kMaxExponent, ep::kMaxExponent, n);
  const float r = (xc - n * ep::kLn2Hi) - n * ep::kLn2Lo;
  float y = ep::kPoly[0];
  for (int i = 1; i < 6; ++i) y = y * r + ep::kPoly[i];
  y = y * (r * r) + r + 1.0f;
  const float two_n = std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return select(under, 0.0f, y * two_n);
}

// FP16 -> FP32, exact (c10's fp16_ieee_to_fp32_value on the bit patterns, so that the loop vectorizes).
inline void half_to_float(const uint16_t* h, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(h[i]) << 16;
    const uint32_t two_w = w + w;
    const float normalized = std::bit_cast<float>((two_w >> 4) + 0x70000000u) * 0x1.0p-112f;
    const float denormalized = std::bit_cast<float>((two_w >> 17) | 0x3F000000u) - 0.5f;
    const uint32_t tiny = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    const uint32_t magnitude =
        (std::bit_cast<uint32_t>(denormalized) & tiny) | (std::bit_cast<uint32_t>(normalized) & ~tiny);
    dst[i] = std::bit_cast<float>((w & 0x80000000u) | magnitude);
  }
}

inline void bf16_to_float(const uint16_t* h, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(h[i]) << 16);
}

// Codes of one packed row (PER codes per byte, element PER * j + i at bits i * 8 / PER) as FP32.
template <int PER>
inline void unpack_row(const uint8_t* src, int64_t d, float* out) {
  constexpr int kBits = 8 / PER;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  for (int64_t j = 0; j < d / PER; ++j) {
    const uint32_t byte = src[j];
    for (int i = 0; i < PER; ++i) out[j * PER + i] = static_cast<float>((byte >> (kBits * i)) & kMask);
  }
}

// clamp(code * scale + zero, -65504, 65504): formats.py's _dequantize (a multiply, an add, then the clamp).
inline float dequant(float code, float scale, float zero) {
  const float y = code * scale + zero;
  return select(y < -kFp16Max, -kFp16Max, select(y > kFp16Max, kFp16Max, y));
}

int codes_per_byte(Elem e) { return e == Elem::U8 ? 1 : e == Elem::U4 ? 2 : 4; }

// Scale / zero pairs of a page: keys one per channel, values one per (position, group).
int64_t meta_count(const Rows& r, int64_t D, int64_t VG, bool keys) { return keys ? D : r.n * (D / VG); }

// Partial maxima / sums in kVec lanes, combined at the end.
float max_of(const float* x, int64_t n) {
  float lane[kVec];
  for (int j = 0; j < kVec; ++j) lane[j] = kNegInf;
  int64_t t = 0;
  for (; t + kVec <= n; t += kVec)
    for (int j = 0; j < kVec; ++j) lane[j] = x[t + j] > lane[j] ? x[t + j] : lane[j];
  for (; t < n; ++t) lane[0] = x[t] > lane[0] ? x[t] : lane[0];
  float m = lane[0];
  for (int j = 1; j < kVec; ++j) m = lane[j] > m ? lane[j] : m;
  return m;
}

float exp_sum(float* x, int64_t n, float ref) {
  float lane[kVec] = {};
  int64_t t = 0;
  for (; t + kVec <= n; t += kVec)
    for (int j = 0; j < kVec; ++j) {
      x[t + j] = exp_nonpositive(x[t + j] - ref);
      lane[j] += x[t + j];
    }
  for (; t < n; ++t) {
    x[t] = exp_nonpositive(x[t] - ref);
    lane[0] += x[t];
  }
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// ---------------------------------------------------------------------------------------------------------------
// Register-blocked products. RB rows at a time; for_row_blocks walks the rows in blocks of 4 (or 2), 2, then 1.
// GCC's loop vectorizer would take the reduction loop of these kernels (over channels, or positions) as in-order
// float reductions and vectorize it with shuffles, 2-3x slower than scalar code; without it the basic-block (SLP)
// vectorizer turns the fixed-size block into packed multiplies and adds. Clang does not vectorize in-order float
// reductions, so it needs nothing.
#if defined(__GNUC__) && !defined(__clang__)
#define KVPREC_SLP_ONLY __attribute__((optimize("no-tree-loop-vectorize")))
#else
#define KVPREC_SLP_ONLY
#endif

template <int MaxRows, typename Fn>
void for_row_blocks(int64_t rows, Fn&& fn) {
  int64_t r = 0;
  if constexpr (MaxRows >= 4)
    for (; r + 4 <= rows; r += 4) fn(std::integral_constant<int, 4>{}, r);
  for (; r + 2 <= rows; r += 2) fn(std::integral_constant<int, 2>{}, r);
  for (; r < rows; ++r) fn(std::integral_constant<int, 1>{}, r);
}

// Scores q[i] . k[t] of RB rows over positions [t0, t1) in kLanes partial sums along the channels (D % 4 == 0):
// lanes[(i * T + t) * kLanes + l] = sum over d = l mod kLanes of q[i, d] k[t, d]. kKeys positions at a time, so
// that a key row serves RB rows and a query row kKeys positions. The lanes are added up by the caller: with the
// horizontal sum in this function GCC 12's SLP vectorizer falls back to scalar code.
template <int RB>
KVPREC_SLP_ONLY void score_lanes(const float* q, const float* k, int64_t D, int64_t t0, int64_t t1, int64_t ldl,
                                 float* lanes) {
  int64_t t = t0;
  for (; t + kKeys <= t1; t += kKeys) {
    float acc[RB][kKeys][kLanes] = {};
    for (int64_t d = 0; d < D; d += kLanes)
      for (int i = 0; i < RB; ++i)
        for (int j = 0; j < kKeys; ++j)
          for (int l = 0; l < kLanes; ++l) acc[i][j][l] += q[i * D + d + l] * k[(t + j) * D + d + l];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < kKeys; ++j)
        for (int l = 0; l < kLanes; ++l) lanes[(i * ldl + t + j) * kLanes + l] = acc[i][j][l];
  }
  for (; t < t1; ++t) {
    float acc[RB][kLanes] = {};
    for (int64_t d = 0; d < D; d += kLanes)
      for (int i = 0; i < RB; ++i)
        for (int l = 0; l < kLanes; ++l) acc[i][l] += q[i * D + d + l] * k[t * D + d + l];
    for (int i = 0; i < RB; ++i)
      for (int l = 0; l < kLanes; ++l) lanes[(i * ldl + t) * kLanes + l] = acc[i][l];
  }
}

// pv[i, :] = sum_{t in [t0, t1)} s[i, t] v[t, :] for RB rows; channels in blocks of CB (kVec, then 4: D % 4 == 0).
template <int RB, int CB>
KVPREC_SLP_ONLY void probs_times_values(const float* s, int64_t lds, const float* v, int64_t D, int64_t t0,
                                        int64_t t1, int64_t c0, int64_t c1, float* pv) {
  for (int64_t c = c0; c + CB <= c1; c += CB) {
    float acc[RB][CB] = {};
    for (int64_t t = t0; t < t1; ++t) {
      const float* vt = v + t * D + c;
      for (int i = 0; i < RB; ++i) {
        const float pt = s[i * lds + t];
        for (int j = 0; j < CB; ++j) acc[i][j] += pt * vt[j];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < CB; ++j) pv[i * D + c + j] = acc[i][j];
  }
}

// Work layout of the scalar kernels: the block as FP32 [n, D], then the page's scales and zeros as FP32, then the
// score lanes [rows, n, kLanes].
struct ScalarWork {
  float *block, *sf, *zf, *lanes;
  ScalarWork(Work& w, int64_t n, int64_t D) {
    block = w.f;
    sf = block + n * D;
    zf = sf + n * D;  // max(D, n * D / VG) <= n * D for n >= 1
    lanes = zf + n * D;
  }
};

void scores(const float* q, int64_t rows, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale, float* s,
            int64_t lds, Work& w) {
  ScalarWork sw(w, k.n, D);
  const float* kf = block_to_float(k, D, 0, true, sw.block, sw.sf, sw.zf);
  for_row_blocks<2>(rows, [&](auto rb, int64_t r) {
    score_lanes<decltype(rb)::value>(q + r * D, kf, D, t0, t1, k.n, sw.lanes + r * k.n * kLanes);
  });
  for (int64_t r = 0; r < rows; ++r) {
    const float* lanes = sw.lanes + r * k.n * kLanes;
    for (int64_t t = t0; t < t1; ++t) {
      const float* x4 = lanes + t * kLanes;
      s[r * lds + t] = ((x4[0] + x4[2]) + (x4[1] + x4[3])) * scale;
    }
  }
}

void values(const float* p, int64_t ldp, int64_t rows, int64_t D, int64_t VG, const Rows& v, int64_t t0, int64_t t1,
            float* pv, Work& w) {
  ScalarWork sw(w, v.n, D);
  const float* vf = block_to_float(v, D, VG, false, sw.block, sw.sf, sw.zf);
  for_row_blocks<4>(rows, [&](auto rb, int64_t r) {
    constexpr int RB = decltype(rb)::value;
    probs_times_values<RB, kVec>(p + r * ldp, ldp, vf, D, t0, t1, 0, D / kVec * kVec, pv + r * D);
    probs_times_values<RB, 4>(p + r * ldp, ldp, vf, D, t0, t1, D / kVec * kVec, D, pv + r * D);
  });
}

constexpr Kernels kScalar = {&scores, &values, &max_of, &exp_sum};

}  // namespace

int64_t work_floats(int64_t rows, int64_t D, int64_t T, int64_t VG) {
  // Scalar: 3 [T, D] arrays and the lanes. SIMD (cpu_attention_simd.h): the same fallback arrays, then for keys
  // q' [D], the quantized query of 4 rows (at most 2 * round_up(D, 256) bytes each), qs, zq and the dots [4, T]; for
  // values the transposed scales / zeros [groups, T], the weights [4, groups, T] and zero terms [4, groups].
  const int64_t groups = D / std::max<int64_t>(VG, 1);
  const int64_t scalar = 3 * T * D + rows * T * kLanes;
  const int64_t simd = 3 * T * D + std::max(4 * D + 1024 + 4 * T, 6 * groups * T + 4 * groups) + 64;
  return std::max(scalar, simd);
}

// |x'| is at most (qmax * scale + |zero|) (1 + 2^-24)^2 before the clamp, so below 65504 (1 - 2^-20) it never binds,
// and the cheaper loop without it gives the same values. (Almost every page: the clamp exists for inputs near
// +-65504.) NaN: binds.
static bool clamp_can_bind(const Rows& r, int64_t D, int64_t VG, bool keys) {
  const int per = codes_per_byte(r.elem);
  const float qmax = static_cast<float>((1 << (8 / per)) - 1);
  const float limit = kFp16Max * (1.0f - 0x1p-20f);
  const int64_t n = meta_count(r, D, VG, keys);
  float sf[64], zf[64];
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - i0);
    half_to_float(r.scale + i0, sf, m);
    half_to_float(r.zero + i0, zf, m);
    for (int64_t i = 0; i < m; ++i)
      if (!(std::fabs(zf[i]) + qmax * std::fabs(sf[i]) < limit)) return true;
  }
  return false;
}

const float* block_to_float(const Rows& r, int64_t D, int64_t VG, bool keys, float* dst, float* sf, float* zf) {
  switch (r.elem) {
    case Elem::F32:
      if (r.ld == D * 4) return reinterpret_cast<const float*>(r.data);
      for (int64_t t = 0; t < r.n; ++t) std::memcpy(dst + t * D, r.data + t * r.ld, D * sizeof(float));
      return dst;
    case Elem::F16:
    case Elem::BF16:
      for (int64_t t = 0; t < r.n; ++t) {
        const auto* h = reinterpret_cast<const uint16_t*>(r.data + t * r.ld);
        if (r.elem == Elem::F16) half_to_float(h, dst + t * D, D);
        else bf16_to_float(h, dst + t * D, D);
      }
      return dst;
    default: break;
  }
  const int64_t n = meta_count(r, D, VG, keys);
  half_to_float(r.scale, sf, n);
  half_to_float(r.zero, zf, n);
  switch (codes_per_byte(r.elem)) {  // a page's rows are contiguous: one row of n * D codes
    case 1: unpack_row<1>(r.data, r.n * D, dst); break;
    case 2: unpack_row<2>(r.data, r.n * D, dst); break;
    default: unpack_row<4>(r.data, r.n * D, dst); break;
  }
  const bool clamp = clamp_can_bind(r, D, VG, keys);
  if (keys) {
    for (int64_t t = 0; t < r.n; ++t) {
      float* o = dst + t * D;
      if (clamp)
        for (int64_t c = 0; c < D; ++c) o[c] = dequant(o[c], sf[c], zf[c]);
      else
        for (int64_t c = 0; c < D; ++c) o[c] = o[c] * sf[c] + zf[c];
    }
    return dst;
  }
  for (int64_t e = 0; e < n; ++e) {
    const float sg = sf[e], zg = zf[e];
    float* o = dst + e * VG;
    if (clamp)
      for (int64_t c = 0; c < VG; ++c) o[c] = dequant(o[c], sg, zg);
    else
      for (int64_t c = 0; c < VG; ++c) o[c] = o[c] * sg + zg;
  }
  return dst;
}

const Kernels* scalar_kernels() { return &kScalar; }

}  // namespace kvprec::cpu
