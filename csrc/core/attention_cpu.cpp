// attend() for a buffer on the CPU: one fused pass, no ATen op per block (kvprec/buffer.h; the math is the one
// written at the top of attention.cpp, which keeps the ATen implementation for other devices).
//
// Why: the ATen loop costs ~30 ops per block (block() alone is index_select + dequantize + index_copy per tier),
// and at decode shapes (a few query rows, 64 x head_dim elements per block) the dispatch overhead is what runs,
// not the arithmetic. Here a block costs one pass over its page.
//
// Work split. One work item is (batch row b, KV head h, tile of queries [i0, i1)); its rows are the G query heads
// of h times those queries (row r = g * n + i - i0, n = i1 - i0), at most kTileRows of them (more only when G alone
// is larger). Decode (Q = 1) is one item per (b, h); a prefill chunk is cut into tiles, so that a tile's scores
// stay in cache and a causal tile stops at the block of its last query. Items run under at::parallel_for; an item
// owns its rows' output from the first block to the last, so nothing is merged across threads and the result is
// the same bits for any thread count. Tiles of one (b, h) are ordered 0, last, 1, last - 1, ... so that the
// contiguous ranges parallel_for hands out mix cheap early tiles with expensive late ones. (at::parallel_for is
// header code: it runs on ATen's OpenMP pool only where this file is compiled with OpenMP, else serially.)
//
// What a thread holds, allocated once per parallel_for range (FP32 unless said):
//   q      [rows, D]       the item's query rows, gathered once per item;
//   k, v   [T, D]          the current block dequantized (or pointers straight into an FP32 page / FP32 tail);
//   sf, zf [max(D, T * D/VG)]   the page's FP16 scales / zeros as FP32 (keys per channel, values per token/group);
//   lanes  [rows, T, kLanes]    scores as partial sums along the channels; s [rows, T] the scores, then p;
//   pv     [rows, D]       sum_t p_t v_t of the block;
//   m, l, alpha, psum, lo, hi [rows], acc [rows, D]   online-softmax state and each row's visible range;
//   sums, refs [rows, nchunks]   per-block sum_t p_t and reference max, for block_mass.
// At T = 64, D = 128 that is ~80 KB for decode with G = 4 and ~280 KB for a 64-row prefill tile (block_mass on).
//
// A block is read from its pool page through the block table (tier, page) once per item and dequantized with the
// formula of kvprec/formats.py, x' = clamp(code * scale + zero, -65504, 65504) in FP32 (two roundings: this file is
// compiled with -ffp-contract=off), so every row sees the same element values as the ATen path. The clamp is
// skipped on pages whose scales and zeros bound |x'| below 65504 (the same values, half the work).
//
// Per row and block: the positions it may see form one range [lo, hi) (causal and window, bottom-right aligned);
// a block outside every row's range is not read at all, and a row whose range misses the block keeps its state
// (what the ATen path computes too: psum = 0 with alpha = 1, or l = acc = 0 while m = -inf). Inside the range
// the user mask sets s = -inf. Then, as in attention.cpp:
//   m' = max(m, max s); ref = m' or 0 while m' = -inf; alpha = exp(m - ref); p = exp(s - ref);
//   l = l * alpha + sum p; acc = acc * alpha + sum_t p_t v_t.
// What differs from ATen: summation orders (dot products, sum p, sum p v), and exp, which is exp_nonpositive below
// (within 1 ulp, as ATen's vectorized Sleef expf is; libm's would not vectorize), tanh and log (libm).
//
// Inner loops are plain C++ that GCC vectorizes at -O3 for the baseline ISA (no -march): register blocks of fixed
// size (RB rows x kKeys positions x kLanes channels for scores, RB rows x kVec channels for p v), reductions kept
// in independent lanes (an in-order float reduction does not vectorize without -ffast-math), and selects written
// on bit patterns where a float ternary would leave control flow in the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kvprec/buffer.h"

namespace kvprec {
namespace {

constexpr float kFp16Max = 65504.0f;
constexpr int64_t kTileRows = 64;  // rows (query heads x queries) per work item
constexpr int kVec = 8;            // channels per register block of p v; lanes of a max / sum over positions
constexpr int kLanes = 4;          // partial sums of a score (along channels; head_dim is a multiple of 4)
constexpr int kKeys = 2;           // positions per register block of scores
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
// 0.5; ATen's Sleef expf_u10: 1). e^0 = 1 exactly.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -87.3365447505531f, kRound = 12582912.0f;  // ln(FLT_MIN); 1.5 * 2^23
  const bool under = x < kMin;
  const float xc = select(under, kMin, x);
  float n = (xc * kLog2e + kRound) - kRound;  // round to nearest
  n = select(n < -126.0f, -126.0f, n);        // also keeps a NaN out of the integer conversion
  n = select(n > 127.0f, 127.0f, n);
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
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

// Partial maxima / sums in kVec lanes, combined at the end.
inline float max_of(const float* x, int64_t n) {
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

// x[t] = exp(x[t] - ref) for t < n; returns their sum.
inline float exp_sum(float* x, int64_t n, float ref) {
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

// Raw view of one tier's pool (PoolView's tensors, contiguous CPU), bytes per page of K / V data.
struct PoolPtrs {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  const uint16_t *ks = nullptr, *kz = nullptr, *vs = nullptr, *vz = nullptr;  // FP16 bit patterns
  int64_t page_bytes = 0;
};

// Everything the kernel reads and writes, as raw pointers (set up once by attend_cpu below).
struct Problem {
  int64_t B, Hkv, D, T, VG, L, Q, G, nchunks, sealed, W, tile_q;
  float scale, softcap;
  const int8_t* tiers;    // [B, Hkv, sealed]
  const int32_t* pages;   // [B, Hkv, sealed]
  std::array<PoolPtrs, kNumTiers> pools;
  const char* tail_k;     // tail element (b, h, t, d) at tail + (b * ts0 + h * ts1 + t * ts2 + d) * elem
  const char* tail_v;
  int64_t ts0, ts1, ts2;
  at::ScalarType dtype;   // model dtype (tail and output)
  const float* q;         // [B, Hq, Q, D] FP32
  const bool* mask;       // [B, Q, L] or null
  void* out;              // [B, Hq, Q, D] model dtype
  float* lse;             // [B, Hq, Q]
  float* mass;            // [B, Hq, Q, nchunks] or null
};

struct Scratch {
  std::vector<float> q, k, v, sf, zf, lanes, s, pv, m, l, alpha, psum, acc, sums, refs;
  std::vector<int64_t> lo, hi;
  Scratch(const Problem& p, int64_t rows)
      : q(rows * p.D), k(p.T * p.D), v(p.T * p.D), sf(std::max(p.D, p.T * (p.D / p.VG))),
        zf(sf.size()), lanes(rows * p.T * kLanes), s(rows * p.T), pv(rows * p.D), m(rows), l(rows), alpha(rows),
        psum(rows), acc(rows * p.D),
        sums(p.mass ? rows * p.nchunks : 0), refs(sums.size()), lo(rows), hi(rows) {}
};

// ---------------------------------------------------------------------------------------------------------------
// Reading a block as FP32 rows [T, D].

// Rows [0, n) of a row-major [n, D] array in a float dtype with row stride `ld` elements: a pointer into the source
// when that is contiguous FP32 already, else the rows converted into `dst`.
const float* float_rows(const char* src, at::ScalarType dt, int64_t n, int64_t ld, const Problem& p, float* dst) {
  const int64_t d = p.D, elem = dt == at::kFloat ? 4 : 2;
  if (dt == at::kFloat && ld == d) return reinterpret_cast<const float*>(src);
  for (int64_t t = 0; t < n; ++t) {
    const char* in = src + t * ld * elem;
    float* o = dst + t * d;
    if (dt == at::kFloat) std::memcpy(o, in, d * sizeof(float));
    else if (dt == at::kHalf) half_to_float(reinterpret_cast<const uint16_t*>(in), o, d);
    else bf16_to_float(reinterpret_cast<const uint16_t*>(in), o, d);
  }
  return dst;
}

// Whether the clamp of clamp(code * scale + zero) can bind on a page whose n scale/zero pairs are sf, zf: |x'| is at
// most (qmax * scale + |zero|) (1 + 2^-24)^2 before the clamp, so below 65504 (1 - 2^-20) it never does, and the
// cheaper loop without it gives the same values. (Almost every page: the clamp exists for inputs near +-65504.)
bool clamp_can_bind(const float* sf, const float* zf, int64_t n, int qmax) {
  const float limit = kFp16Max * (1.0f - 0x1p-20f);
  for (int64_t i = 0; i < n; ++i)
    if (!(std::fabs(zf[i]) + static_cast<float>(qmax) * std::fabs(sf[i]) < limit)) return true;  // NaN: true
  return false;
}

// Codes of a page, unpacked into dst [T, D], turned in place into x' = clamp(code * scale + zero) with keys' scale /
// zero per channel (sf, zf [D]) or values' per (token, group of VG channels) (sf, zf [T, D/VG]).
template <bool CLAMP>
void scale_rows(const float* sf, const float* zf, bool keys, const Problem& p, float* dst) {
  const int64_t d = p.D;
  if (keys) {
    for (int64_t t = 0; t < p.T; ++t) {
      float* o = dst + t * d;
      for (int64_t c = 0; c < d; ++c) o[c] = CLAMP ? dequant(o[c], sf[c], zf[c]) : o[c] * sf[c] + zf[c];
    }
    return;
  }
  for (int64_t e = 0; e < p.T * (d / p.VG); ++e) {
    const float sg = sf[e], zg = zf[e];
    float* o = dst + e * p.VG;
    for (int64_t c = 0; c < p.VG; ++c) o[c] = CLAMP ? dequant(o[c], sg, zg) : o[c] * sg + zg;
  }
}

template <int PER>
void dequantize_page(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, bool keys, const Problem& p,
                     Scratch& w, float* dst) {
  const int64_t n = keys ? p.D : p.T * (p.D / p.VG);
  float* sf = w.sf.data();
  float* zf = w.zf.data();
  half_to_float(scale, sf, n);
  half_to_float(zero, zf, n);
  unpack_row<PER>(codes, p.T * p.D, dst);  // a page's rows are contiguous: one row of T * D codes
  if (clamp_can_bind(sf, zf, n, (1 << (8 / PER)) - 1)) scale_rows<true>(sf, zf, keys, p, dst);
  else scale_rows<false>(sf, zf, keys, p, dst);
}

// K (keys) or V of sealed block c of (b, h) as FP32 rows [T, D]: the FP32 page itself, else dst.
const float* load_sealed(const Problem& p, int64_t b, int64_t h, int64_t c, bool keys, Scratch& w, float* dst) {
  const int64_t e = (b * p.Hkv + h) * p.sealed + c, page = p.pages[e];
  const Tier tier = static_cast<Tier>(p.tiers[e]);
  const PoolPtrs& pool = p.pools[tier_index(tier)];
  const char* data = reinterpret_cast<const char*>(keys ? pool.k : pool.v) + page * pool.page_bytes;
  const int64_t meta = page * (keys ? p.D : p.T * (p.D / p.VG));  // first scale / zero of the page
  const uint16_t* scale = (keys ? pool.ks : pool.vs) + meta;
  const uint16_t* zero = (keys ? pool.kz : pool.vz) + meta;
  const auto* codes = reinterpret_cast<const uint8_t*>(data);
  switch (tier) {
    case Tier::FP32: return float_rows(data, at::kFloat, p.T, p.D, p, dst);
    case Tier::FP16: return float_rows(data, at::kHalf, p.T, p.D, p, dst);
    case Tier::BF16: return float_rows(data, at::kBFloat16, p.T, p.D, p, dst);
    case Tier::INT8: dequantize_page<1>(codes, scale, zero, keys, p, w, dst); break;
    case Tier::INT4: dequantize_page<2>(codes, scale, zero, keys, p, w, dst); break;
    case Tier::INT2: dequantize_page<4>(codes, scale, zero, keys, p, w, dst); break;
  }
  return dst;
}

// ---------------------------------------------------------------------------------------------------------------
// Register-blocked products. RB rows at a time; for_row_blocks walks the rows in blocks of 4 (or 2), 2, then 1.
// GCC's loop vectorizer would take the reduction loop of these kernels (over channels, or positions) as in-order
// float reductions and vectorize it with shuffles, 2-3x slower than scalar code; without it the basic-block (SLP)
// vectorizer turns the fixed-size block into packed multiplies and adds. Clang does not
// vectorize in-order float reductions, so it needs nothing.
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
KVPREC_SLP_ONLY void score_lanes(const float* q, const float* k, int64_t t0, int64_t t1, const Problem& p,
                                 float* lanes) {
  const int64_t D = p.D;
  int64_t t = t0;
  for (; t + kKeys <= t1; t += kKeys) {
    float acc[RB][kKeys][kLanes] = {};
    for (int64_t d = 0; d < D; d += kLanes)
      for (int i = 0; i < RB; ++i)
        for (int j = 0; j < kKeys; ++j)
          for (int l = 0; l < kLanes; ++l) acc[i][j][l] += q[i * D + d + l] * k[(t + j) * D + d + l];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < kKeys; ++j)
        for (int l = 0; l < kLanes; ++l) lanes[(i * p.T + t + j) * kLanes + l] = acc[i][j][l];
  }
  for (; t < t1; ++t) {
    float acc[RB][kLanes] = {};
    for (int64_t d = 0; d < D; d += kLanes)
      for (int i = 0; i < RB; ++i)
        for (int l = 0; l < kLanes; ++l) acc[i][l] += q[i * D + d + l] * k[t * D + d + l];
    for (int i = 0; i < RB; ++i)
      for (int l = 0; l < kLanes; ++l) lanes[(i * p.T + t) * kLanes + l] = acc[i][l];
  }
}

// pv[i, :] = sum_{t in [t0, t1)} s[i, t] v[t, :] for RB rows; channels in blocks of CB (kVec, then 4: D % 4 == 0).
template <int RB, int CB>
KVPREC_SLP_ONLY void probs_times_values(const float* s, const float* v, int64_t t0, int64_t t1, int64_t c0, int64_t c1,
                        const Problem& p, float* pv) {
  for (int64_t c = c0; c + CB <= c1; c += CB) {
    float acc[RB][CB] = {};
    for (int64_t t = t0; t < t1; ++t) {
      const float* vt = v + t * p.D + c;
      for (int i = 0; i < RB; ++i) {
        const float pt = s[i * p.T + t];
        for (int j = 0; j < CB; ++j) acc[i][j] += pt * vt[j];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < CB; ++j) pv[i * p.D + c + j] = acc[i][j];
  }
}

template <typename out_t>
void store_row(const float* acc, float l, int64_t d, void* out, int64_t offset) {
  out_t* o = static_cast<out_t*>(out) + offset;
  for (int64_t c = 0; c < d; ++c) o[c] = static_cast<out_t>(acc[c] / l);  // nearest even, as ATen's .to()
}

// ---------------------------------------------------------------------------------------------------------------
// One work item: batch row b, KV head h, queries [i0, i1).

void attend_item(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, Scratch& w) {
  const int64_t D = p.D, n = i1 - i0, rows = p.G * n, Hq = p.Hkv * p.G;
  for (int64_t g = 0; g < p.G; ++g)
    std::memcpy(w.q.data() + g * n * D, p.q + ((b * Hq + h * p.G + g) * p.Q + i0) * D, n * D * sizeof(float));
  std::fill_n(w.m.begin(), rows, kNegInf);
  std::fill_n(w.l.begin(), rows, 0.0f);
  std::fill_n(w.acc.begin(), rows * D, 0.0f);
  if (p.mass) {
    std::fill_n(w.sums.begin(), rows * p.nchunks, 0.0f);
    std::fill_n(w.refs.begin(), rows * p.nchunks, 0.0f);
  }
  // Query i sits at position L - Q + i; it sees (pos - W, pos] (W = 0: [0, pos]).
  const int64_t first_pos = p.L - p.Q + i0, last_pos = p.L - p.Q + i1 - 1;
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t start = c * p.T, len = std::min(p.T, p.L - start);
    if (start > last_pos) break;                                   // causal: no later block is seen either
    if (p.W > 0 && start + len - 1 <= first_pos - p.W) continue;   // below every row's window
    // Visible ranges, and the positions [t_lo, t_hi) that some row sees.
    int64_t t_lo = len, t_hi = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = p.L - p.Q + i0 + r % n;
      w.hi[r] = std::min(len, pos - start + 1);
      w.lo[r] = p.W > 0 ? std::max<int64_t>(0, pos - p.W + 1 - start) : 0;
      if (w.lo[r] < w.hi[r]) {
        t_lo = std::min(t_lo, w.lo[r]);
        t_hi = std::max(t_hi, w.hi[r]);
      }
    }
    if (t_lo >= t_hi) continue;
    const float* k;
    const float* v;
    if (c < p.sealed) {
      k = load_sealed(p, b, h, c, true, w, w.k.data());
      v = load_sealed(p, b, h, c, false, w, w.v.data());
    } else {
      const int64_t off = (b * p.ts0 + h * p.ts1) * static_cast<int64_t>(c10::elementSize(p.dtype));
      k = float_rows(p.tail_k + off, p.dtype, len, p.ts2, p, w.k.data());
      v = float_rows(p.tail_v + off, p.dtype, len, p.ts2, p, w.v.data());
    }
    // Scores of every row over the positions some row sees, as kLanes partial sums (a row's own range is applied
    // below, where the lanes are added up).
    for_row_blocks<2>(rows, [&](auto rb, int64_t r) {
      score_lanes<decltype(rb)::value>(w.q.data() + r * D, k, t_lo, t_hi, p, w.lanes.data() + r * p.T * kLanes);
    });
    // Softmax statistics per row; s becomes p over [t_lo, t_hi) (0 outside the row's range).
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s.data() + r * p.T;
      const int64_t lo = w.lo[r], hi = w.hi[r];
      if (lo >= hi) {  // nothing of this block is visible to the row: its state is unchanged
        std::fill(s + t_lo, s + t_hi, 0.0f);
        continue;
      }
      const bool* mrow = p.mask ? p.mask + (b * p.Q + i0 + r % n) * p.L + start : nullptr;
      const float* lanes = w.lanes.data() + r * p.T * kLanes;
      for (int64_t t = lo; t < hi; ++t) {
        const float* x4 = lanes + t * kLanes;
        s[t] = ((x4[0] + x4[2]) + (x4[1] + x4[3])) * p.scale;
      }
      if (p.softcap > 0.0f)
        for (int64_t t = lo; t < hi; ++t) s[t] = std::tanh(s[t] / p.softcap) * p.softcap;
      if (mrow)
        for (int64_t t = lo; t < hi; ++t) s[t] = select(mrow[t], s[t], kNegInf);
      const float m_new = std::max(w.m[r], max_of(s + lo, hi - lo));
      const float ref = std::isinf(m_new) ? 0.0f : m_new;  // m_new is -inf or finite
      w.alpha[r] = exp_nonpositive(w.m[r] - ref);
      w.psum[r] = exp_sum(s + lo, hi - lo, ref);
      w.m[r] = m_new;
      std::fill(s + t_lo, s + lo, 0.0f);
      std::fill(s + hi, s + t_hi, 0.0f);
      if (p.mass) {
        w.sums[r * p.nchunks + c] = w.psum[r];
        w.refs[r * p.nchunks + c] = ref;
      }
    }
    // pv = p v over [t_lo, t_hi), then acc = acc * alpha + pv and l = l * alpha + psum for the rows that see the block.
    for_row_blocks<4>(rows, [&](auto rb, int64_t r) {
      constexpr int RB = decltype(rb)::value;
      const float* s = w.s.data() + r * p.T;
      float* pv = w.pv.data() + r * D;
      probs_times_values<RB, kVec>(s, v, t_lo, t_hi, 0, D / kVec * kVec, p, pv);
      probs_times_values<RB, 4>(s, v, t_lo, t_hi, D / kVec * kVec, D, p, pv);
    });
    for (int64_t r = 0; r < rows; ++r) {
      if (w.lo[r] >= w.hi[r]) continue;
      const float alpha = w.alpha[r];
      float* acc = w.acc.data() + r * D;
      const float* pv = w.pv.data() + r * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pv[d];
      w.l[r] = w.l[r] * alpha + w.psum[r];
    }
  }
  // Rows that saw no position keep l = 0, acc = 0, m = -inf: out 0, lse -inf, mass 0.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = (b * Hq + h * p.G + r / n) * p.Q + i0 + r % n;
    const bool seen = w.l[r] > 0.0f;
    const float l_safe = seen ? w.l[r] : 1.0f;
    const float* acc = w.acc.data() + r * D;
    switch (p.dtype) {
      case at::kFloat: store_row<float>(acc, l_safe, D, p.out, o * D); break;
      case at::kHalf: store_row<c10::Half>(acc, l_safe, D, p.out, o * D); break;
      default: store_row<c10::BFloat16>(acc, l_safe, D, p.out, o * D); break;
    }
    p.lse[o] = seen ? w.m[r] + std::log(l_safe) : kNegInf;
    if (p.mass) {
      const float m_safe = seen ? w.m[r] : 0.0f;
      for (int64_t c = 0; c < p.nchunks; ++c) {  // ref_c <= m wherever block c contributed: exponent <= 0
        const float sc = w.sums[r * p.nchunks + c], ref = w.refs[r * p.nchunks + c];
        p.mass[o * p.nchunks + c] = sc > 0.0f ? sc * exp_nonpositive(ref - m_safe) / l_safe : 0.0f;
      }
    }
  }
}

}  // namespace

namespace detail {

// Called by attend() (attention.cpp) after it has checked the arguments, for a buffer on the CPU.
AttentionResult attend_cpu(const MixedPrecisionBuffer& buffer, const at::Tensor& q, const at::Tensor& mask,
                           const AttentionOptions& options) {
  const BufferOptions& bo = buffer.options();
  Problem p;
  p.B = bo.batch;
  p.Hkv = bo.kv_heads;
  p.D = bo.head_dim;
  p.T = bo.block_size;
  p.VG = bo.group_size;
  p.L = buffer.seq_len();
  p.Q = q.size(2);
  p.G = q.size(1) / p.Hkv;
  p.nchunks = (p.L + p.T - 1) / p.T;
  p.sealed = buffer.num_sealed_blocks();
  p.W = options.sliding_window;
  p.tile_q = std::clamp<int64_t>(kTileRows / p.G, 1, p.Q);
  p.scale = static_cast<float>(options.scale > 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(p.D)));
  p.softcap = static_cast<float>(options.softcap);
  p.dtype = bo.dtype;

  const at::Tensor tiers = buffer.tiers().contiguous(), pages = buffer.pages().contiguous();  // host copies
  p.tiers = tiers.data_ptr<int8_t>();
  p.pages = pages.data_ptr<int32_t>();
  std::array<bool, kNumTiers> used{};
  for (int64_t e = 0; e < tiers.numel(); ++e)
    if (p.tiers[e] != kEvictedTier) used[p.tiers[e]] = true;  // attend() checked the window skips evicted blocks
  std::array<PoolView, kNumTiers> views;  // keeps the pool tensors alive for the call
  for (Tier t : kAllTiers) {
    if (!used[tier_index(t)]) continue;
    PoolView& pv = views[tier_index(t)] = buffer.pool(t);
    PoolPtrs& pp = p.pools[tier_index(t)];
    TORCH_INTERNAL_ASSERT(pv.k.is_cpu() && pv.k.is_contiguous() && pv.v.is_contiguous());
    pp.k = static_cast<const uint8_t*>(pv.k.const_data_ptr());
    pp.v = static_cast<const uint8_t*>(pv.v.const_data_ptr());
    pp.page_bytes = pv.k.stride(0) * static_cast<int64_t>(pv.k.element_size());
    if (tier_is_integer(t)) {
      for (const at::Tensor* m : {&pv.k_scale, &pv.k_zero, &pv.v_scale, &pv.v_zero})
        TORCH_INTERNAL_ASSERT(m->scalar_type() == at::kHalf && m->is_contiguous());
      pp.ks = static_cast<const uint16_t*>(pv.k_scale.const_data_ptr());
      pp.kz = static_cast<const uint16_t*>(pv.k_zero.const_data_ptr());
      pp.vs = static_cast<const uint16_t*>(pv.v_scale.const_data_ptr());
      pp.vz = static_cast<const uint16_t*>(pv.v_zero.const_data_ptr());
    }
  }
  const at::Tensor tk = buffer.tail_keys(), tv = buffer.tail_values();  // views of [B, H, T, D]
  TORCH_INTERNAL_ASSERT(tk.stride(3) == 1 && tk.strides() == tv.strides());
  p.tail_k = static_cast<const char*>(tk.const_data_ptr());
  p.tail_v = static_cast<const char*>(tv.const_data_ptr());
  p.ts0 = tk.stride(0);
  p.ts1 = tk.stride(1);
  p.ts2 = tk.stride(2);

  const at::Tensor qf = q.to(at::kCPU, at::kFloat).contiguous();
  p.q = qf.const_data_ptr<float>();
  const at::Tensor mk = mask.defined() ? mask.to(at::kCPU).contiguous() : at::Tensor();
  p.mask = mk.defined() ? mk.const_data_ptr<bool>() : nullptr;

  const int64_t Hq = q.size(1);
  AttentionResult result;
  result.out = at::empty({p.B, Hq, p.Q, p.D}, at::TensorOptions().dtype(bo.dtype));
  result.lse = at::empty({p.B, Hq, p.Q}, at::TensorOptions().dtype(at::kFloat));
  if (options.block_mass) result.block_mass = at::empty({p.B, Hq, p.Q, p.nchunks}, at::kFloat);
  p.out = result.out.data_ptr();
  p.lse = result.lse.data_ptr<float>();
  p.mass = options.block_mass ? result.block_mass.data_ptr<float>() : nullptr;

  const int64_t tiles = (p.Q + p.tile_q - 1) / p.tile_q;
  at::parallel_for(0, p.B * p.Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p, p.G * p.tile_q);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / tiles, k = item % tiles;
      const int64_t tile = k % 2 == 0 ? k / 2 : tiles - 1 - k / 2;  // 0, last, 1, last - 1, ...
      const int64_t i0 = tile * p.tile_q;
      attend_item(p, bh / p.Hkv, bh % p.Hkv, i0, std::min(p.Q, i0 + p.tile_q), w);
    }
  });
  return result;
}

}  // namespace detail
}  // namespace kvprec
