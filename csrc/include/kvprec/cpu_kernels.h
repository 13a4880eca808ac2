// Internal: the per-block kernels of the CPU attention (csrc/core/attention_cpu.cpp drives them), one table per
// instruction-set path (kvprec/cpu_isa.h). Torch-free and inline-free, so that a translation unit compiled for
// AVX-512 shares no inline code with one compiled for the baseline ISA (the linker keeps one copy of an inline
// function, which could then be the AVX-512 one).
//
// Numerical contract (what each path computes for one block; the driver does the online softmax):
//   float storage (FP32 / FP16 / BF16 pages, the tail): s = scale * sum_c q_c k_c and pv = sum_t p_t v_t in FP32 on
//     the stored values converted exactly; paths differ only in summation order and fused multiply-adds
//     (|error| <= D * 2^-23 * sum_c |q_c k_c| per score, T * 2^-23 * sum_t p_t |v_t| per value).
//   integer storage, scalar path: each page dequantized to FP32 first, x' = clamp(code * scale + zero), exactly as
//     kvprec/formats.py, then as above.
//   integer storage, SIMD paths (kvprec/cpu_attention_simd.h), keys scored from their codes:
//     q'_c = q_c * ks_c (FP32), zq = sum_c q_c kz_c, a = max_c |q'_c|, qs = a / QMAX,
//     qi_c = round_half_even(q'_c / qs) (integers, |qi_c| <= QMAX), s_t = scale * (qs * sum_c qi_c code_tc + zq),
//     QMAX = 127 for INT4 / INT2 (an int8 query: u8 x s8 products) and min(32767, (2^31 - 1) / (255 D)) for INT8
//     (an int16 query: u16 x s16 products); the integer dot product is exact in int32.
//     Against the keys dequantized in exact arithmetic, the error of a score is at most
//       scale * (0.52 qs sum_c code_tc  +  (D + 8) 2^-23 sum_c |q_c| (|code_tc ks_c| + |kz_c|))
//     (qs / 2 from rounding q' / qs, widened for the FP32 roundings of inv = QMAX / a and q' * inv; the second term
//     covers the FP32 roundings of q', zq and the final sum).
//     Values from their codes: pv_c = sum_t (p_t vs_tg) code_tc + sum_t p_t vz_tg in FP32 (FMA), the same as the
//     dequantized values up to FP32 rounding. Pages whose scale / zero could reach the clamp (|x'| near 65504) are
//     dequantized first, as on the scalar path.
//   A score error of at most e on every position moves each softmax weight by a factor within [e^-2e, e^2e]: the
//   output moves by at most (e^2e - 1) * max_t |v_t| per channel and the log-sum-exp by at most e.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvprec::cpu {

// How the rows of one block are stored.
enum class Elem : int8_t { F32, F16, BF16, U8, U4, U2 };

// One block of keys or values: row t (a position) at data + t * ld bytes, t < n. Integer kinds hold a whole page:
// rows are contiguous (ld = D * bits / 8), keys' scale / zero FP16 [D], values' FP16 [n, D / VG].
struct Rows {
  Elem elem = Elem::F32;
  const uint8_t* data = nullptr;
  int64_t ld = 0;
  int64_t n = 0;
  const uint16_t* scale = nullptr;
  const uint16_t* zero = nullptr;
};

// Scratch of one thread (the driver allocates it once per parallel range, kernels carve it up).
struct Work {
  float* f = nullptr;
  int64_t nf = 0;
};
// Floats of Work a call needs, for up to `rows` rows.
int64_t work_floats(int64_t rows, int64_t D, int64_t T, int64_t VG);

struct Kernels {
  // s[r * lds + t] = scale * q_r . k_t for r < rows, t0 <= t < t1; q [rows, D] FP32 row-major.
  void (*scores)(const float* q, int64_t rows, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale,
                 float* s, int64_t lds, Work& w);
  // pv[r * D + c] = sum_{t0 <= t < t1} p[r * ldp + t] v_t[c] for r < rows (value group VG for integer kinds).
  void (*values)(const float* p, int64_t ldp, int64_t rows, int64_t D, int64_t VG, const Rows& v, int64_t t0,
                 int64_t t1, float* pv, Work& w);
  // max of x[0, n) (-inf for n = 0); exp_sum: x[t] = e^(x[t] - ref) (x <= ref or -inf), returns their sum.
  float (*max)(const float* x, int64_t n);
  float (*exp_sum)(float* x, int64_t n, float ref);
};

// The table of the active path (kvprec::active_cpu_isa(); throws as it does).
const Kernels& kernels();

// Per path (csrc/core/attention_cpu_<isa>.cpp); null where the build has no such path.
const Kernels* scalar_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* avx512_vnni_kernels();

// The inner loops of the CPU quantize_append over one block's FP32 tile [t, d] (kvprec/cpu_quantize_loops.h),
// compiled per path (csrc/core/quantize_append_<isa>.cpp): bit for bit the same codes on every path.
struct QuantizeLoops {
  void (*keys_min_max)(const float* tile, int64_t t, int64_t d, float* mn, float* mx);
  void (*encode_keys)(const float* tile, int64_t t, int64_t d, const float* zf, const float* sf, float qmax,
                      uint8_t* codes);
  void (*encode_values)(const float* tile, int64_t t, int64_t d, int64_t g, const float* zf, const float* sf,
                        float qmax, uint8_t* codes);
  void (*pack)(const uint8_t* codes, int64_t bytes, int per, uint8_t* out);  // per = 2 or 4
};
// Those of the active path (the AVX-512 paths use the avx512 build of the loops); throws as kernels() does.
const QuantizeLoops& quantize_loops();
const QuantizeLoops* scalar_quantize_loops();
const QuantizeLoops* avx2_quantize_loops();
const QuantizeLoops* avx512_quantize_loops();

// Scalar helpers the SIMD paths fall back on (attention_cpu_scalar.cpp): a block converted to FP32 rows [n, D]
// in dst (integer kinds dequantized with the clamp, as kvprec/formats.py), returning the rows to read (an FP32 block
// that is contiguous already is returned as is). sf, zf: scratch of max(D, n * D / VG) floats each.
const float* block_to_float(const Rows& r, int64_t D, int64_t VG, bool keys, float* dst, float* sf, float* zf);

}  // namespace kvprec::cpu
