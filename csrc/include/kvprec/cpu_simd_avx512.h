// Internal: the vector traits of kvprec/cpu_attention_simd.h for 512-bit registers (AVX-512 F/BW/VL/DQ), included
// by csrc/core/attention_cpu_avx512.cpp and attention_cpu_avx512_vnni.cpp. With KVPREC_AVX512_VNNI defined (the
// latter, compiled with -mavx512vnni) the integer dot products are single VNNI instructions (vpdpbusd, vpdpwssd);
// without it, vpmaddubsw / vpmaddwd and an add. A test that emulates the instructions (csrc/tests/
// cpu_avx512_emulated.h) supplies the intrinsics itself and defines KVPREC_NO_IMMINTRIN.
#pragma once

#ifndef KVPREC_NO_IMMINTRIN
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace {

struct V {
  static constexpr int W = 16;   // floats per F
  static constexpr int IB = 64;  // bytes per I
  using F = __m512;
  using I = __m512i;

  static __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static F load_n_fill(const float* p, int n, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes(n), p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static void store_n(float* p, F x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_f16_n(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static F bf16_bits(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static F load_bf16(const uint16_t* p) { return bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_bf16_n(const uint16_t* p, int n) { return bf16_bits(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  // Whether some lane has !(x < lim) (NaN included).
  static bool any_nlt(F x, F lim) { return _mm512_cmp_ps_mask(x, lim, _CMP_NLT_UQ) != 0; }
  static F abs(F a) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff))); }
  static __m256 half(F a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static float hsum(F a) {
    const __m256 h = half(a);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static float hmax(F a) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static void hsum4(F a, F b, F c, F d, float* out) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  // What simd_exp_nonpos (kvprec/cpu_attention_simd.h) needs beyond the above: lane masks, rounding, 2^n.
  using M = __mmask16;
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }  // a where m, else b
  static F zero_where(M m, F x) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(~m), x); }
  static F round_nearest(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  // 2^n for integral n in [-126, 127].
  static F pow2(F n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static void f16_to_f32(const uint16_t* h, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store(dst + i, load_f16(h + i));
    if (i < n) store_n(dst + i, load_f16_n(h + i, static_cast<int>(n - i)), static_cast<int>(n - i));
  }
  static __m512i round_i32(const float* x, int64_t c, int64_t D, float inv) {
    const F v = c + 16 <= D ? load(x + c) : load_n(x + c, static_cast<int>(D - c));
    return _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));
  }
  static void quantize_i8(const float* x, float inv, int64_t D, int8_t* dst, int64_t count) {
    int64_t c = 0;
    for (; c < D; c += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm512_cvtsepi32_epi8(round_i32(x, c, D, inv)));
    std::memset(dst + c, 0, static_cast<size_t>(count - c));
  }
  static void quantize_i16(const float* x, float inv, int64_t D, int16_t* dst, int64_t count) {
    int64_t c = 0;
    for (; c < D; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm512_cvtsepi32_epi16(round_i32(x, c, D, inv)));
    std::memset(dst + c, 0, static_cast<size_t>(count - c) * 2);
  }

  // out[i] = a * float(x[i]) + b for i < n.
  static void affine_i32(const int32_t* x, int64_t n, float a, float b, float* out) {
    const F va = set1(a), vb = set1(b);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store(out + i, fmadd(va, _mm512_cvtepi32_ps(_mm512_loadu_si512(x + i)), vb));
    if (i < n) {
      const int m = static_cast<int>(n - i);
      store_n(out + i, fmadd(va, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(lanes(m), x + i)), vb), m);
    }
  }
  static I zero_i() { return _mm512_setzero_si512(); }
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static I widen_u8(const uint8_t* p, int64_t avail) {
    const __mmask32 m = avail >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << avail) - 1u);
    return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, p));
  }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  // Partial u8 x s8 dot products (scores_int_rows): int32 lanes with VNNI, else int16 lanes as on AVX2.
#ifdef KVPREC_AVX512_VNNI
  static I dot_s16(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
  using A = __m512i;  // int32 lanes: vpdpbusd adds 4 products to each
  static constexpr bool kPartInt16 = false;
  static A zero_a() { return _mm512_setzero_si512(); }
  template <int PER>
  static A dot_part(A acc, const I* u, const int8_t* q) {
    for (int v = 0; v < PER; ++v) acc = _mm512_dpbusd_epi32(acc, u[v], load_i(q + v * IB));
    return acc;
  }
  static I part_to_i32(A a) { return a; }
#else
  static I dot_s16(I acc, I a, I b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
  using A = __m512i;
  static constexpr bool kPartInt16 = true;
  static A zero_a() { return _mm512_setzero_si512(); }
  template <int PER>
  static A dot_part(A s, const I* u, const int8_t* q) {
    for (int v = 0; v < PER; ++v) s = _mm512_add_epi16(s, _mm512_maddubs_epi16(u[v], load_i(q + v * IB)));
    return s;
  }
  static I part_to_i32(A s) { return _mm512_madd_epi16(s, _mm512_set1_epi16(1)); }
#endif
  template <int PER>
  static void unpack(I x, I* u) {
    if constexpr (PER == 2) {
      const I m = _mm512_set1_epi8(0x0F);
      const I lo = _mm512_and_si512(x, m), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
      u[0] = _mm512_unpacklo_epi8(lo, hi);
      u[1] = _mm512_unpackhi_epi8(lo, hi);
    } else {
      const I m = _mm512_set1_epi8(0x03);
      const I x0 = _mm512_and_si512(x, m), x1 = _mm512_and_si512(_mm512_srli_epi16(x, 2), m);
      const I x2 = _mm512_and_si512(_mm512_srli_epi16(x, 4), m), x3 = _mm512_and_si512(_mm512_srli_epi16(x, 6), m);
      const I a = _mm512_unpacklo_epi8(x0, x1), b = _mm512_unpacklo_epi8(x2, x3);
      const I c = _mm512_unpackhi_epi8(x0, x1), d = _mm512_unpackhi_epi8(x2, x3);
      u[0] = _mm512_unpacklo_epi16(a, b);
      u[1] = _mm512_unpackhi_epi16(a, b);
      u[2] = _mm512_unpacklo_epi16(c, d);
      u[3] = _mm512_unpackhi_epi16(c, d);
    }
  }
  static __m256i half_i(I a) { return _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1)); }
  static int32_t hsum_i(I a) {
    const __m256i h = half_i(a);
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
    return _mm_cvtsi128_si32(x);
  }
  static void hsum4_i(I a, I b, I c, I d, int32_t* out) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(half_i(a), half_i(b)), _mm256_hadd_epi32(half_i(c), half_i(d)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  // Values from their codes, strided channels (see attention_cpu_avx2.cpp).
  static I load_u8_u32(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <int SHIFT, int BITS>
  static F field(I x) {
    if constexpr (SHIFT > 0) x = _mm512_srli_epi32(x, SHIFT);
    if constexpr (SHIFT + BITS < 8) x = _mm512_and_si512(x, _mm512_set1_epi32((1 << BITS) - 1));
    return _mm512_cvtepi32_ps(x);
  }
  static void store_interleaved(float* dst, F a, F b) {
    // per 128-bit lane L: lo = a4L b4L a4L+1 b4L+1, hi = a4L+2 b4L+2 a4L+3 b4L+3; out = lo.0 hi.0 lo.1 hi.1 | lo.2 ...
    const F lo = _mm512_unpacklo_ps(a, b), hi = _mm512_unpackhi_ps(a, b);
    const F x = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
    const F y = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
    store(dst, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(3, 1, 2, 0)));
    store(dst + 16, _mm512_shuffle_f32x4(y, y, _MM_SHUFFLE(3, 1, 2, 0)));
  }
  template <int PER, int NV>
  static void codes_to_float(const uint8_t* p, F* out) {
    constexpr int kBytes = NV * W / PER;  // 32, 16, 8 or 4
    if constexpr (PER == 1) {
      out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      if constexpr (NV == 2)
        out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
      return;
    }
    __m128i x;
    if constexpr (kBytes == 16) x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    else if constexpr (kBytes == 8) x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    else {
      int32_t v;
      std::memcpy(&v, p, 4);
      x = _mm_cvtsi32_si128(v);
    }
    __m128i n0, n1;
    if constexpr (PER == 2) {
      const __m128i m = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
      n0 = _mm_unpacklo_epi8(lo, hi);
      n1 = _mm_unpackhi_epi8(lo, hi);
    } else {
      const __m128i m = _mm_set1_epi8(0x03);
      const __m128i a = _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 2), m));
      const __m128i b = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(_mm_srli_epi16(x, 6), m));
      n0 = _mm_unpacklo_epi16(a, b);
      n1 = _mm_unpackhi_epi16(a, b);
    }
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n0));
    if constexpr (NV == 2) out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(n1));
  }
};

}  // namespace
