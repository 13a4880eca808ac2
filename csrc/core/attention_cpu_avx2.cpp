// The AVX2 + FMA + F16C path of the CPU attention kernels: the vector traits of kvprec/cpu_attention_simd.h for
// 256-bit registers. Compiled with -mavx2 -mfma -mf16c (CMakeLists.txt); called only after the dispatcher
// (cpu_isa.cpp) has seen those features in cpuid.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kvprec/cpu_kernels.h"

namespace {

struct V {
  static constexpr int W = 8;    // floats per F
  static constexpr int IB = 32;  // bytes per I
  using F = __m256;
  using I = __m256i;

  // Lanes [0, n) of a mask (n <= 8).
  static __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static F load_n_fill(const float* p, int n, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), load_n(p, n), _mm256_castsi256_ps(lanes(n)));
  }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static void store_n(float* p, F x, int n) { _mm256_maskstore_ps(p, lanes(n), x); }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_f16_n(const uint16_t* p, int n) {  // n = 4 (head_dim is a multiple of 4)
    (void)n;
    return _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static F bf16_bits(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static F load_bf16(const uint16_t* p) { return bf16_bits(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_bf16_n(const uint16_t* p, int n) {
    (void)n;
    return bf16_bits(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  // Whether some lane has !(x < lim) (NaN included).
  static bool any_nlt(F x, F lim) { return _mm256_movemask_ps(_mm256_cmp_ps(x, lim, _CMP_NLT_UQ)) != 0; }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static float hsum(F a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static float hmax(F a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  // out[i] = sum of the lanes of a_i.
  static void hsum4(F a, F b, F c, F d, float* out) {
    const F h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  // What simd_exp_nonpos (kvprec/cpu_attention_simd.h) needs beyond the above: lane masks, rounding, 2^n.
  using M = __m256;
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }  // a where m, else b
  static F zero_where(M m, F x) { return _mm256_andnot_ps(m, x); }
  static F round_nearest(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  // 2^n for integral n in [-126, 127].
  static F pow2(F n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  // n FP16 values to FP32 (exact).
  static void f16_to_f32(const uint16_t* h, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store(dst + i, load_f16(h + i));
    if (i < n) {
      alignas(16) uint16_t buf[8] = {};
      std::memcpy(buf, h + i, static_cast<size_t>(n - i) * 2);
      store_n(dst + i, load_f16(buf), static_cast<int>(n - i));
    }
  }
  // round_half_even(x[c] * inv) for c < D as int8 / int16 into dst, zeros up to `count` elements.
  static __m128i round_i16(const float* x, int64_t c, int64_t D, float inv) {
    const F v = c + 8 <= D ? load(x + c) : load_n(x + c, static_cast<int>(D - c));
    const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(v, _mm256_set1_ps(inv)));
    return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  }
  static void quantize_i8(const float* x, float inv, int64_t D, int8_t* dst, int64_t count) {
    int64_t c = 0;
    for (; c < D; c += 8) {
      const __m128i w = round_i16(x, c, D, inv);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c), _mm_packs_epi16(w, w));
    }
    std::memset(dst + c, 0, static_cast<size_t>(count - c));
  }
  static void quantize_i16(const float* x, float inv, int64_t D, int16_t* dst, int64_t count) {
    int64_t c = 0;
    for (; c < D; c += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), round_i16(x, c, D, inv));
    std::memset(dst + c, 0, static_cast<size_t>(count - c) * 2);
  }

  // out[i] = a * float(x[i]) + b for i < n.
  static void affine_i32(const int32_t* x, int64_t n, float a, float b, float* out) {
    const F va = set1(a), vb = set1(b);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      store(out + i, fmadd(va, _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), vb));
    if (i < n) {
      const int m = static_cast<int>(n - i);
      store_n(out + i, fmadd(va, _mm256_cvtepi32_ps(_mm256_maskload_epi32(x + i, lanes(m))), vb), m);
    }
  }
  static I zero_i() { return _mm256_setzero_si256(); }
  static I load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  // IB / 2 code bytes (or the `avail` < IB / 2 there, then zeros) as u16 lanes.
  static I widen_u8(const uint8_t* p, int64_t avail) {
    if (avail >= 16) return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint8_t buf[16] = {};
    std::memcpy(buf, p, static_cast<size_t>(avail));
    return _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static I dot_s16(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  // Codes of one IB-byte load as PER vectors of u8 (vector v's 16-byte lane L: natural block PER * L + v).
  template <int PER>
  static void unpack(I x, I* u) {
    if constexpr (PER == 2) {
      const I m = _mm256_set1_epi8(0x0F);
      const I lo = _mm256_and_si256(x, m), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m);
      u[0] = _mm256_unpacklo_epi8(lo, hi);
      u[1] = _mm256_unpackhi_epi8(lo, hi);
    } else {
      const I m = _mm256_set1_epi8(0x03);
      const I x0 = _mm256_and_si256(x, m), x1 = _mm256_and_si256(_mm256_srli_epi16(x, 2), m);
      const I x2 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m), x3 = _mm256_and_si256(_mm256_srli_epi16(x, 6), m);
      const I a = _mm256_unpacklo_epi8(x0, x1), b = _mm256_unpacklo_epi8(x2, x3);
      const I c = _mm256_unpackhi_epi8(x0, x1), d = _mm256_unpackhi_epi8(x2, x3);
      u[0] = _mm256_unpacklo_epi16(a, b);
      u[1] = _mm256_unpackhi_epi16(a, b);
      u[2] = _mm256_unpacklo_epi16(c, d);
      u[3] = _mm256_unpackhi_epi16(c, d);
    }
  }
  // Partial u8 x s8 dot products (scores_int_rows): int16 lanes (kPartInt16), each the sum of 2 products per
  // vpmaddubsw, widened to int32 by part_to_i32.
  using A = __m256i;
  static constexpr bool kPartInt16 = true;
  static A zero_a() { return _mm256_setzero_si256(); }
  template <int PER>
  static A dot_part(A s, const I* u, const int8_t* q) {
    for (int v = 0; v < PER; ++v) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u[v], load_i(q + v * IB)));
    return s;
  }
  static I part_to_i32(A s) { return _mm256_madd_epi16(s, _mm256_set1_epi16(1)); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static int32_t hsum_i(I a) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
    return _mm_cvtsi128_si32(x);
  }
  static void hsum4_i(I a, I b, I c, I d, int32_t* out) {
    const I h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  // Values from their codes, strided channels (values_int_strided): W code bytes as W u32 lanes; a field of each
  // lane as FP32 (x < 256: the top field needs no mask); dst[2j] = a[j], dst[2j + 1] = b[j] for j < W.
  static I load_u8_u32(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  template <int SHIFT, int BITS>
  static F field(I x) {
    if constexpr (SHIFT > 0) x = _mm256_srli_epi32(x, SHIFT);
    if constexpr (SHIFT + BITS < 8) x = _mm256_and_si256(x, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(x);
  }
  static void store_interleaved(float* dst, F a, F b) {
    // per 128-bit lane: lo = a0 b0 a1 b1, hi = a2 b2 a3 b3
    const F lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    store(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
    store(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  // NV * W codes of a packed row (natural order) as FP32.
  static void u8x16_to_float(__m128i b, F* out, int nv) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    if (nv == 2) out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  }
  template <int PER, int NV>
  static void codes_to_float(const uint8_t* p, F* out) {
    constexpr int kBytes = NV * W / PER;
    __m128i x;
    if constexpr (kBytes == 16) x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    else if constexpr (kBytes == 8) x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    else if constexpr (kBytes == 4) {
      int32_t v;
      std::memcpy(&v, p, 4);
      x = _mm_cvtsi32_si128(v);
    } else {
      uint16_t v;
      std::memcpy(&v, p, 2);
      x = _mm_cvtsi32_si128(v);
    }
    if constexpr (PER == 2) {
      const __m128i m = _mm_set1_epi8(0x0F);
      x = _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 4), m));
    } else if constexpr (PER == 4) {
      const __m128i m = _mm_set1_epi8(0x03);
      const __m128i a = _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 2), m));
      const __m128i b = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(_mm_srli_epi16(x, 6), m));
      x = _mm_unpacklo_epi16(a, b);
    }
    u8x16_to_float(x, out, NV);
  }
};

}  // namespace

#include "kvprec/cpu_attention_simd.h"

namespace kvprec::cpu {
const Kernels* avx2_kernels() { return &kSimdKernels; }
}  // namespace kvprec::cpu
