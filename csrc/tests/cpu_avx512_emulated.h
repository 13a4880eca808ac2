// The AVX-512 kernels (kvprec/cpu_simd_avx512.h over kvprec/cpu_attention_simd.h) compiled against SIMDe's portable
// implementations of the intrinsics, so that a CPU without AVX-512 runs them; each result is compared with the AVX2
// kernels (checked against the reference by test_attention) on the same inputs: every storage kind, awkward head
// dims, block sizes, value groups, row counts and position ranges, the clamp fallback, max and exp_sum.
// The includer defines KVPREC_AVX512_VNNI or not, then includes this file. Without SIMDe's headers (the cmeel-simde
// wheel, or KVPREC_SIMDE_INCLUDE at configure time) the test says so and passes nothing.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "check.h"
#include "kvprec/cpu_isa.h"
#include "kvprec/cpu_kernels.h"

#if defined(KVPREC_HAVE_SIMDE) && defined(KVPREC_HAVE_AVX2)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// Intrinsics SIMDe 0.8.2 lacks, written the plain way.
inline simde__m256i kvprec_maskz_loadu_epi8(simde__mmask32 k, const void* p) {
  alignas(32) uint8_t b[32] = {};
  for (int i = 0; i < 32; ++i)
    if (k >> i & 1u) b[i] = static_cast<const uint8_t*>(p)[i];
  return simde_mm256_loadu_si256(reinterpret_cast<const simde__m256i*>(b));
}
inline simde__m512i kvprec_maskz_loadu_epi32(simde__mmask16 k, const void* p) {
  alignas(64) int32_t b[16] = {};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1u) b[i] = static_cast<const int32_t*>(p)[i];
  return simde_mm512_load_si512(b);
}
inline simde__m512i kvprec_cvtepu8_epi16(simde__m256i x) {
  alignas(32) uint8_t in[32];
  alignas(64) int16_t out[32];
  simde_mm256_storeu_si256(reinterpret_cast<simde__m256i*>(in), x);
  for (int i = 0; i < 32; ++i) out[i] = in[i];
  return simde_mm512_load_si512(out);
}
inline simde__m512i kvprec_cvtepu8_epi32(simde__m128i x) {
  alignas(16) uint8_t in[16];
  alignas(64) int32_t out[16];
  simde_mm_storeu_si128(reinterpret_cast<simde__m128i*>(in), x);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_load_si512(out);
}
// SIMDe's masked loads and stores may touch the masked-off lanes' memory (a full load, a blend, a full store);
// the instructions never do, and the kernels rely on it at the ends of rows: element-wise versions.
inline simde__m512 kvprec_mask_loadu_ps(simde__m512 src, simde__mmask16 k, const void* p) {
  alignas(64) float b[16];
  simde_mm512_storeu_ps(b, src);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1u) b[i] = static_cast<const float*>(p)[i];
  return simde_mm512_loadu_ps(b);
}
inline simde__m512 kvprec_maskz_loadu_ps(simde__mmask16 k, const void* p) {
  return kvprec_mask_loadu_ps(simde_mm512_setzero_ps(), k, p);
}
inline void kvprec_mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 x) {
  alignas(64) float b[16];
  simde_mm512_storeu_ps(b, x);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1u) static_cast<float*>(p)[i] = b[i];
}
inline simde__m256i kvprec_maskz_loadu_epi16(simde__mmask16 k, const void* p) {
  alignas(32) uint16_t b[16] = {};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1u) b[i] = static_cast<const uint16_t*>(p)[i];
  return simde_mm256_loadu_si256(reinterpret_cast<const simde__m256i*>(b));
}
#undef _mm512_mask_loadu_ps
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#define _mm512_mask_loadu_ps kvprec_mask_loadu_ps
#define _mm512_maskz_loadu_ps kvprec_maskz_loadu_ps
#define _mm512_mask_storeu_ps kvprec_mask_storeu_ps
#define _mm256_maskz_loadu_epi16 kvprec_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi8 kvprec_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi32 kvprec_maskz_loadu_epi32
#define _mm512_cvtepu8_epi16 kvprec_cvtepu8_epi16
#define _mm512_cvtepu8_epi32 kvprec_cvtepu8_epi32

#define KVPREC_NO_IMMINTRIN
#include "kvprec/cpu_simd_avx512.h"
#include "kvprec/cpu_attention_simd.h"

namespace {

using kvprec::cpu::Elem;
using kvprec::cpu::Kernels;

const char* elem_name(Elem e) {
  const char* names[] = {"f32", "f16", "bf16", "u8", "u4", "u2"};
  return names[static_cast<int>(e)];
}

// One block of `n` positions of kind e: data, scales and zeros as the buffer lays them out (random).
struct Block {
  at::Tensor data, scale, zero;
  kvprec::cpu::Rows rows;
};

Block make_block(Elem e, int64_t n, int64_t D, int64_t VG, bool keys, bool near_clamp) {
  Block b;
  const int per = e == Elem::U8 ? 1 : e == Elem::U4 ? 2 : 4;
  const bool integer = e == Elem::U8 || e == Elem::U4 || e == Elem::U2;
  if (!integer) {
    const at::Tensor x = at::randn({n, D});
    b.data = e == Elem::F32 ? x : x.to(e == Elem::F16 ? at::kHalf : at::kBFloat16);
    b.rows.ld = D * b.data.element_size();
  } else {
    b.data = at::randint(0, 256, {n, D / per}, at::kByte);
    const int64_t m = keys ? D : n * (D / VG);
    b.scale = (at::rand({m}) * 0.1 + 0.01).to(at::kHalf);
    b.zero = (at::randn({m}) * 0.5).to(at::kHalf);
    if (near_clamp) b.zero[0] = 65000.0;
    b.rows.ld = D / per;
    b.rows.scale = static_cast<const uint16_t*>(b.scale.data_ptr());
    b.rows.zero = static_cast<const uint16_t*>(b.zero.data_ptr());
  }
  b.rows.elem = e;
  b.rows.data = static_cast<const uint8_t*>(b.data.data_ptr());
  b.rows.n = n;
  return b;
}

double rel_diff(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).abs() / (b.abs() + 1.0)).max().item<double>();
}

int run_emulated(const char* name) {
  const Kernels* avx2 = kvprec::cpu::avx2_kernels();
  if (!kvprec::cpu_isa_supported(kvprec::CpuIsa::Avx2)) {
    std::printf("SKIPPED %s: the AVX2 kernels it is compared with cannot run here\n", name);
    return 0;
  }
  const Kernels& emu = kSimdKernels;
  at::manual_seed(0);
  int cases = 0;
  for (Elem e : {Elem::F32, Elem::F16, Elem::BF16, Elem::U8, Elem::U4, Elem::U2})
    for (auto [D, VG] : {std::pair<int64_t, int64_t>{4, 4}, {12, 4}, {20, 20}, {36, 12}, {64, 32}, {64, 64},
                         {128, 64}, {128, 16}, {256, 64}, {96, 48}, {80, 16}, {40, 8}})
      for (int64_t T : {1, 2, 16, 64})
        for (int64_t rows : {1, 2, 3, 4, 5, 6, 7, 9})
          for (bool near_clamp : {false, true}) {
            if (near_clamp && (e == Elem::F32 || e == Elem::F16 || e == Elem::BF16 || rows != 4)) continue;
            const int64_t t0 = T > 2 ? T / 4 : 0, t1 = T > 2 ? T - 1 : T;
            const Block kb = make_block(e, T, D, VG, true, near_clamp);
            const Block vb = make_block(e, T, D, VG, false, near_clamp);
            const at::Tensor q = at::randn({rows, D});
            const at::Tensor p = at::rand({rows, T});
            // The kernels' scratch, with a guard band that must stay untouched.
            const int64_t nw = kvprec::cpu::work_floats(rows, D, T, VG);
            std::vector<float> work(nw + 256, 12345.0f);
            kvprec::cpu::Work w{work.data(), nw};
            auto guard_intact = [&] {
              for (int64_t i = nw; i < nw + 256; ++i)
                if (work[i] != 12345.0f) return false;
              return true;
            };
            at::Tensor s1 = at::zeros({rows, T}), s2 = at::zeros({rows, T});
            avx2->scores(q.data_ptr<float>(), rows, D, kb.rows, t0, t1, 0.3f, s1.data_ptr<float>(), T, w);
            const bool g1 = guard_intact();
            emu.scores(q.data_ptr<float>(), rows, D, kb.rows, t0, t1, 0.3f, s2.data_ptr<float>(), T, w);
            const bool g2 = guard_intact();
            at::Tensor pv1 = at::zeros({rows, D}), pv2 = at::zeros({rows, D});
            avx2->values(p.data_ptr<float>(), T, rows, D, VG, vb.rows, t0, t1, pv1.data_ptr<float>(), w);
            const bool g3 = guard_intact();
            emu.values(p.data_ptr<float>(), T, rows, D, VG, vb.rows, t0, t1, pv2.data_ptr<float>(), w);
            const bool g4 = guard_intact();
            CHECK(g1 && g2 && g3 && g4);
            if (!(g1 && g2 && g3 && g4)) {
              std::fprintf(stderr, "  (scratch overrun %d%d%d%d: %s D=%ld VG=%ld T=%ld rows=%ld)\n", g1, g2, g3, g4,
                           elem_name(e), static_cast<long>(D), static_cast<long>(VG), static_cast<long>(T),
                           static_cast<long>(rows));
              return 1;
            }
            // Same integer query and dots: the scores differ only by FP32 summation order of the float parts.
            const double ds = rel_diff(s2.narrow(1, t0, t1 - t0), s1.narrow(1, t0, t1 - t0));
            const double dv = rel_diff(pv2, pv1);
            CHECK(ds <= 2e-5);
            CHECK(dv <= 2e-5);
            if (ds > 2e-5 || dv > 2e-5)
              std::fprintf(stderr, "  (%s: %s D=%ld VG=%ld T=%ld rows=%ld clamp=%d: scores %g values %g)\n", name,
                           elem_name(e), static_cast<long>(D), static_cast<long>(VG), static_cast<long>(T),
                           static_cast<long>(rows), near_clamp, ds, dv);
            ++cases;
          }
  for (int64_t n : {1, 7, 16, 33}) {
    at::Tensor x = at::randn({n}) * 3 - 5, y = x.clone();
    CHECK(emu.max(x.data_ptr<float>(), n) == avx2->max(x.data_ptr<float>(), n));
    const float ref = x.max().item<float>();
    const float a = avx2->exp_sum(x.data_ptr<float>(), n, ref), b = emu.exp_sum(y.data_ptr<float>(), n, ref);
    CHECK(std::fabs(a - b) <= 1e-6 * n && rel_diff(y, x) <= 1e-6);
  }
  std::printf("%s: %d kernel cases against avx2\n", name, cases);
  return 0;
}

}  // namespace
#else
namespace {
int run_emulated(const char* name) {
  std::printf("SKIPPED %s: SIMDe headers not found at configure time (pip install cmeel-simde, or "
              "-DKVPREC_SIMDE_INCLUDE=<dir holding simde/>), or no AVX2 kernels to compare with\n", name);
  return 0;
}
}  // namespace
#endif
