// Internal: the constants of the CPU kernels' e^x for x <= 0 (Cephes expf), one set for every path: the scalar
// path's exp_nonpositive (csrc/core/attention_cpu_scalar.cpp) and the SIMD paths' simd_exp_nonpos
// (kvprec/cpu_attention_simd.h, one definition over the vector traits of each width) evaluate this polynomial:
//   x = n ln2 + r (n = round(x log2 e) within [-126, 127], ln2 in two parts so that r is exact), |r| <= ln2 / 2,
//   e^r = 1 + r + r^2 (P5 + r (P4 + r (P3 + r (P2 + r (P1 + r P0))))), 2^n through the exponent bits,
//   0 below ln(FLT_MIN) (no subnormals).
// Constants only (no inline code: see kvprec/cpu_kernels.h on why the paths share none).
#pragma once

namespace kvprec::cpu::exp_poly {

inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693359375f;    // ln 2 = kLn2Hi - kLn2Lo (kLn2Hi has 9 significant bits)
inline constexpr float kLn2Lo = -2.12194440e-4f;
inline constexpr float kMin = -87.3365447505531f;  // ln(FLT_MIN): below it e^x is returned as 0
inline constexpr float kMinExponent = -126.0f, kMaxExponent = 127.0f;
inline constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};  // P0 .. P5

}  // namespace kvprec::cpu::exp_poly
