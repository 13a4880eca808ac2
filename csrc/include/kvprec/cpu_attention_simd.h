// Internal: the SIMD paths of the CPU attention kernels (kvprec/cpu_kernels.h), written once over a vector traits
// class V and included by one translation unit per instruction set (csrc/core/attention_cpu_avx2.cpp,
// attention_cpu_avx512.cpp), each compiled with its own -m flags. Everything here is in the including file's
// anonymous namespace: no inline function is shared with another path. The includer defines, before including:
//   struct V  with  W (floats per vector F), IB (bytes per integer vector I) and the operations used below
//   (loads / converts / fmadd / horizontal sums, the lane masks and 2^n of simd_exp_nonpos, the partial integer
//   dot products A / dot_part / part_to_i32 and dot_s16, and the strided code loads of values_int_strided).
//
// What is computed is the contract of kvprec/cpu_kernels.h. How:
//   keys, integer pages: per page and query row, q'_c = q_c ks_c, zq = sum_c q_c kz_c, qi_c = round(q'_c * QMAX / a);
//     the codes are unpacked in registers (shift and mask; INT4 / INT2 interleaved back with unpack instructions,
//     which leaves the channels in natural order up to a permutation of 16-byte blocks that the query copy
//     follows), and the integer dot product runs as u8 x s8 (INT4 / INT2: int16 partial sums over a few chunks, then
//     widened) or u16 x s16 (INT8) multiply-adds into int32 lanes; the query rows of a register block (RB = 4, then
//     one block of the 3, 2 or 1 left) share each unpacked code vector;
//   values, integer pages: per page w[r, g, t] = p[r, t] vs[t, g] and zs[r, g] = sum_t p[r, t] vz[t, g]; INT4 / INT2
//     (where PER W channels share a group): one widening load of W code bytes per position gives the channels
//     c + PER j + k as the k-th bit field of lane j, two fields at a time multiply-added into the block's rows'
//     accumulators and interleaved back to natural order at the end; INT8 (and the other group sizes): the codes of
//     2W channels of a position converted to FP32 once and multiply-added into the rows' accumulators. Either way each
//     channel's sum runs over t in order, one FMA per position, and a pass over the positions takes as many channels
//     as keep 8 to 12 accumulators (independent FMA chains) whatever RB is;
//   float pages and the tail: converted in registers (F16C for FP16, a shift for BF16), FMA into the block's rows.
//   Horizontal sums of the scores: 4 at a time (V::hsum4), the 4 rows of one position or, for fewer rows, the 4
//   positions of one row.
// Pages whose scale / zero could reach the FP16 clamp, and value groups that are not a multiple of W channels, go
// through the scalar dequantization (block_to_float) and the float kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvprec/cpu_exp_poly.h"
#include "kvprec/cpu_kernels.h"

namespace {

using kvprec::cpu::Elem;
using kvprec::cpu::Rows;
using kvprec::cpu::Work;

constexpr float kNegInfSimd = -__builtin_inff();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Whether clamp(code * scale + zero, +-65504) cannot bind for n scale / zero pairs (FP32, converted exactly): the
// test of kvprec::cpu::clamp_can_bind, |zero| + qmax |scale| < 65504 (1 - 2^-20), on the pairs a call reads.
bool clamp_cannot_bind(const float* sf, const float* zf, int64_t n, float qmax) {
  const typename V::F limit = V::set1(65504.0f * (1.0f - 0x1p-20f)), qm = V::set1(qmax);
  bool bad = false;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W)
    bad |= V::any_nlt(V::fmadd(qm, V::abs(V::load(sf + i)), V::abs(V::load(zf + i))), limit);
  if (i < n) {
    const int m = static_cast<int>(n - i);
    bad |= V::any_nlt(V::fmadd(qm, V::abs(V::load_n(sf + i, m)), V::abs(V::load_n(zf + i, m))), limit);
  }
  return !bad;
}

// ---------------------------------------------------------------------------------------------------------------
// Softmax helpers.

// e^x for x <= 0, lane by lane: the polynomial of kvprec/cpu_exp_poly.h (that of the scalar path's exp_nonpositive),
// with fused multiply-adds. -inf -> 0; below ln(FLT_MIN) -> 0.
inline typename V::F simd_exp_nonpos(typename V::F x) {
  namespace ep = kvprec::cpu::exp_poly;
  using F = typename V::F;
  const F lowest = V::set1(ep::kMin);
  const typename V::M under = V::lt(x, lowest);
  const F xc = V::select(under, lowest, x);
  F n = V::round_nearest(V::mul(xc, V::set1(ep::kLog2e)));
  n = V::min(V::max(n, V::set1(ep::kMinExponent)), V::set1(ep::kMaxExponent));
  F r = V::fnmadd(n, V::set1(ep::kLn2Hi), xc);
  r = V::fnmadd(n, V::set1(ep::kLn2Lo), r);
  F y = V::set1(ep::kPoly[0]);
  for (int i = 1; i < 6; ++i) y = V::fmadd(y, r, V::set1(ep::kPoly[i]));
  y = V::add(V::fmadd(y, V::mul(r, r), r), V::set1(1.0f));
  return V::zero_where(under, V::mul(y, V::pow2(n)));
}

float simd_max(const float* x, int64_t n) {
  typename V::F m = V::set1(kNegInfSimd);
  int64_t t = 0;
  for (; t + V::W <= n; t += V::W) m = V::max(m, V::load(x + t));
  if (t < n) m = V::max(m, V::load_n_fill(x + t, static_cast<int>(n - t), kNegInfSimd));
  return V::hmax(m);
}

float simd_exp_sum(float* x, int64_t n, float ref) {
  const typename V::F r = V::set1(ref);
  typename V::F acc = V::zero();
  int64_t t = 0;
  for (; t + V::W <= n; t += V::W) {
    const typename V::F e = simd_exp_nonpos(V::sub(V::load(x + t), r));
    V::store(x + t, e);
    acc = V::add(acc, e);
  }
  if (t < n) {
    const int m = static_cast<int>(n - t);
    const typename V::F e = simd_exp_nonpos(V::sub(V::load_n_fill(x + t, m, kNegInfSimd), r));  // e^-inf = 0
    V::store_n(x + t, e, m);
    acc = V::add(acc, e);
  }
  return V::hsum(acc);
}

// ---------------------------------------------------------------------------------------------------------------
// Float rows: W (or n < W) channels of row `row` starting at channel c, as FP32.

template <Elem E>
inline typename V::F load_row(const uint8_t* row, int64_t c) {
  if constexpr (E == Elem::F32) return V::load(reinterpret_cast<const float*>(row) + c);
  else if constexpr (E == Elem::F16) return V::load_f16(reinterpret_cast<const uint16_t*>(row) + c);
  else return V::load_bf16(reinterpret_cast<const uint16_t*>(row) + c);
}

template <Elem E>
inline typename V::F load_row_n(const uint8_t* row, int64_t c, int n) {
  if constexpr (E == Elem::F32) return V::load_n(reinterpret_cast<const float*>(row) + c, n);
  else if constexpr (E == Elem::F16) return V::load_f16_n(reinterpret_cast<const uint16_t*>(row) + c, n);
  else return V::load_bf16_n(reinterpret_cast<const uint16_t*>(row) + c, n);
}

// Positions per horizontal reduction in the score loops. RB = 4: one position, its 4 rows' sums through one V::hsum4.
// Fewer rows: 4 positions, each row's 4 sums through one V::hsum4 (so rows < 4 do not pay a whole horizontal sum
// per row and position, and the scores of a row come out as 4 consecutive values); the 4 positions' dot products
// are also independent chains (a single row's chain of FMAs would wait on their latency).
template <int RB>
constexpr int positions_per_reduction() {
  static_assert(RB >= 1 && RB <= 4, "register blocks of 1 to 4 rows");
  return RB == 4 ? 1 : 4;
}

// The rows of one position's FP32 dot products (float storage): acc[i] = q_i . k (not yet summed across lanes).
template <Elem E, int RB>
inline void dot_float_position(const float* q, int64_t D, int64_t full, int rest, const uint8_t* row,
                               typename V::F* acc) {
  for (int i = 0; i < RB; ++i) acc[i] = V::zero();
  for (int64_t c = 0; c < full; c += V::W) {
    const typename V::F kv = load_row<E>(row, c);
    for (int i = 0; i < RB; ++i) acc[i] = V::fmadd(V::load(q + i * D + c), kv, acc[i]);
  }
  if (rest) {
    const typename V::F kv = load_row_n<E>(row, full, rest);
    for (int i = 0; i < RB; ++i) acc[i] = V::fmadd(V::load_n(q + i * D + full, rest), kv, acc[i]);
  }
}

// s[r, t] = scale * q_r . k_t for RB rows, float storage: each lane adds its channels' products in order, then the
// lanes are summed by V::hsum4 (V::hsum for the last < PB positions); the contract allows either order.
template <Elem E, int RB>
void scores_float_rows(const float* q, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale, float* s,
                       int64_t lds) {
  constexpr int PB = positions_per_reduction<RB>();
  const int64_t full = D / V::W * V::W;
  const int rest = static_cast<int>(D - full);
  int64_t t = t0;
  for (; t + PB <= t1; t += PB) {
    typename V::F acc[PB * RB];
    for (int j = 0; j < PB; ++j) dot_float_position<E, RB>(q, D, full, rest, k.data + (t + j) * k.ld, acc + j * RB);
    float out[4];
    if constexpr (PB == 1) {
      V::hsum4(acc[0], acc[1], acc[2], acc[3], out);
      for (int i = 0; i < 4; ++i) s[i * lds + t] = out[i] * scale;
    } else {
      for (int i = 0; i < RB; ++i) {
        V::hsum4(acc[i], acc[RB + i], acc[2 * RB + i], acc[3 * RB + i], out);
        for (int j = 0; j < 4; ++j) s[i * lds + t + j] = out[j] * scale;
      }
    }
  }
  for (; t < t1; ++t) {
    typename V::F acc[RB];
    dot_float_position<E, RB>(q, D, full, rest, k.data + t * k.ld, acc);
    for (int i = 0; i < RB; ++i) s[i * lds + t] = V::hsum(acc[i]) * scale;
  }
}

// Rows of the register blocks: 4 at a time, then one block of the 3, 2 or 1 left (a GQA group of 3 query heads is
// one pass over the page, not 2 + 1). fn(std::integral_constant<int, RB>, first row).
template <typename Fn>
inline void for_row_blocks(int64_t rows, Fn&& fn) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) fn(std::integral_constant<int, 4>{}, r);
  switch (rows - r) {
    case 3: fn(std::integral_constant<int, 3>{}, r); break;
    case 2: fn(std::integral_constant<int, 2>{}, r); break;
    case 1: fn(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

template <Elem E>
void scores_float(const float* q, int64_t rows, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale,
                  float* s, int64_t lds) {
  for_row_blocks(rows, [&](auto rb, int64_t r) {
    scores_float_rows<E, decltype(rb)::value>(q + r * D, D, k, t0, t1, scale, s + r * lds, lds);
  });
}

// Vectors of channels the value loops take per pass over the positions for RB rows: RB * NV accumulators, 8 to 12 of
// them, so that the FMA chains (one per accumulator, one FMA per position) do not wait on each other's latency.
template <int RB>
constexpr int value_vectors() {
  return RB == 1 ? 8 : RB == 4 ? 2 : 4;
}

// pv[r, c..c + NV W) = sum_t p[r, t] v_t[c..] for RB rows, float storage (rest > 0: the rest < W channels at c).
template <Elem E, int RB, int NV>
void values_float_chunk(const float* p, int64_t ldp, int64_t D, const Rows& v, int64_t t0, int64_t t1, int64_t c,
                        int rest, float* pv) {
  typename V::F acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V::zero();
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* row = v.data + t * v.ld;
    typename V::F x[NV];
    if (rest) x[0] = load_row_n<E>(row, c, rest);
    else
      for (int j = 0; j < NV; ++j) x[j] = load_row<E>(row, c + j * V::W);
    for (int i = 0; i < RB; ++i) {
      const typename V::F b = V::set1(p[i * ldp + t]);
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fmadd(b, x[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    if (rest) V::store_n(pv + i * D + c, acc[i][0], rest);
    else
      for (int j = 0; j < NV; ++j) V::store(pv + i * D + c + j * V::W, acc[i][j]);
  }
}

// Channels value_vectors<RB>() W at a time, then 2W, W, the rest. Each channel's sum runs over t in order (one FMA
// per position), however the channels are grouped.
template <Elem E, int RB>
void values_float_rows(const float* p, int64_t ldp, int64_t D, const Rows& v, int64_t t0, int64_t t1, float* pv) {
  constexpr int kNV = value_vectors<RB>();
  int64_t c = 0;
  for (; c + kNV * V::W <= D; c += kNV * V::W) values_float_chunk<E, RB, kNV>(p, ldp, D, v, t0, t1, c, 0, pv);
  for (; c + 2 * V::W <= D; c += 2 * V::W) values_float_chunk<E, RB, 2>(p, ldp, D, v, t0, t1, c, 0, pv);
  for (; c + V::W <= D; c += V::W) values_float_chunk<E, RB, 1>(p, ldp, D, v, t0, t1, c, 0, pv);
  if (c < D) values_float_chunk<E, RB, 1>(p, ldp, D, v, t0, t1, c, static_cast<int>(D - c), pv);
}

template <Elem E>
void values_float(const float* p, int64_t ldp, int64_t rows, int64_t D, const Rows& v, int64_t t0, int64_t t1,
                  float* pv) {
  for_row_blocks(rows, [&](auto rb, int64_t r) {
    values_float_rows<E, decltype(rb)::value>(p + r * ldp, ldp, D, v, t0, t1, pv + r * D);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Keys from their codes.

// The query of RB rows prepared for one page: qi [RB][qbytes] (int8 in the block order of the unpacked codes, or
// int16 in natural order), per row qs and zq.
struct KeyQuery {
  int8_t* qi;
  int64_t qbytes;
  float* qs;
  float* zq;
};

// Quantize q' (FP32 [D], natural order) of one row into dst: int8 (PER > 1, the block order of the unpacked codes,
// zero past D) or int16 (PER == 1, natural order, zero past D); returns qs.
template <int PER>
float quantize_query_row(const float* qp, float a, int64_t D, float qmax, float* tmp, int8_t* dst, int64_t qbytes) {
  const float qs = a / qmax;
  const float inv = a > 0.0f ? qmax / a : 0.0f;
  if constexpr (PER == 1) {
    V::quantize_i16(qp, inv, D, reinterpret_cast<int16_t*>(dst), qbytes / 2);
  } else {
    // Natural order into tmp (as bytes), then 16-byte blocks to their place: chunk k of IB bytes unpacks into PER
    // vectors; vector v's 16-byte lane L holds natural block k * PER * IB / 16 + PER * L + v.
    auto* nat = reinterpret_cast<int8_t*>(tmp);
    V::quantize_i8(qp, inv, D, nat, qbytes);
    constexpr int kLanes = V::IB / 16;
    const int64_t chunks = qbytes / (PER * V::IB);
    for (int64_t k = 0; k < chunks; ++k)
      for (int v = 0; v < PER; ++v)
        for (int L = 0; L < kLanes; ++L)
          std::memcpy(dst + (k * PER + v) * V::IB + 16 * L, nat + (k * PER * kLanes + PER * L + v) * 16, 16);
  }
  return qs;
}

// Per row: q' = q ks (into tmp), zq = q . kz, a = max |q'|; then the quantized row.
template <int PER>
void prepare_key_query(const float* q, int64_t rows, int64_t D, const float* ks, const float* kz, float qmax,
                       float* tmp, float* qp, KeyQuery& kq) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = q + r * D;
    typename V::F amax = V::zero(), z = V::zero();
    int64_t c = 0;
    for (; c + V::W <= D; c += V::W) {
      const typename V::F x = V::load(qr + c), y = V::mul(x, V::load(ks + c));
      V::store(qp + c, y);
      amax = V::max(amax, V::abs(y));
      z = V::fmadd(x, V::load(kz + c), z);
    }
    if (c < D) {
      const int n = static_cast<int>(D - c);
      const typename V::F x = V::load_n(qr + c, n), y = V::mul(x, V::load_n(ks + c, n));
      V::store_n(qp + c, y, n);
      amax = V::max(amax, V::abs(y));
      z = V::fmadd(x, V::load_n(kz + c, n), z);
    }
    kq.zq[r] = V::hsum(z);
    kq.qs[r] = quantize_query_row<PER>(qp, V::hmax(amax), D, qmax, tmp, kq.qi + r * kq.qbytes, kq.qbytes);
  }
}

// IB bytes at p, or the m < IB bytes there and zeros (no read past them).
inline typename V::I load_bytes(const uint8_t* p, int64_t m) {
  if (m >= V::IB) return V::load_i(p);
  alignas(64) uint8_t buf[V::IB] = {};
  std::memcpy(buf, p, static_cast<size_t>(m));
  return V::load_i(buf);
}

// Chunks whose u8 x s8 products one V::A lane may hold. Int16 lanes: a lane gains at most PER * 2 * cmax * 127 per
// chunk (cmax = 15 for INT4, 3 for INT2: 7620 / 3048), so 32767 / that many chunks never saturate vpmaddubsw nor
// wrap the int16 adds; int32 lanes (VNNI) hold any row.
template <int PER>
constexpr int64_t part_chunks() {
  return V::kPartInt16 ? 32767 / (PER * 2 * ((1 << (8 / PER)) - 1) * 127) : int64_t{1} << 40;
}

// The RB rows' integer dot products with the codes of one position (row: its codes; avail: bytes from there to the
// end of the page), as int32 lanes not yet summed across. FULL: every chunk lies inside its row (row_bytes is a
// multiple of the chunk), so no chunk needs the bounds check of a row's end.
// INT4 / INT2 (PER > 1): the u8 x s8 products of up to part_chunks<PER>() chunks add up in V::A (int16 lanes without
// VNNI) before one widening to int32, which keeps the widening out of the chunk loop. NCH > 0: the row is NCH
// chunks (known at compile time, so the loops unroll and the accumulators stay in registers); 0: `chunks`.
template <int PER, int RB, bool FULL, int NCH>
inline void dot_int_position(const KeyQuery& kq, const uint8_t* row, int64_t avail, int64_t runtime_chunks,
                             typename V::I* acc) {
  const int64_t chunks = NCH > 0 ? NCH : runtime_chunks;
  // PER > 1: chunks of IB code bytes (PER * IB channels); PER == 1: IB / 2 code bytes widened to 16 bits.
  constexpr int64_t kChunk = PER == 1 ? V::IB / 2 : V::IB;
  for (int i = 0; i < RB; ++i) acc[i] = V::zero_i();
  if constexpr (PER == 1) {
    for (int64_t j = 0; j < chunks; ++j) {
      // Bytes past the row belong to the next row (their query bytes are 0): read them, unless past the page.
      const typename V::I x = V::widen_u8(row + j * kChunk, FULL ? kChunk : avail - j * kChunk);
      for (int i = 0; i < RB; ++i) acc[i] = V::dot_s16(acc[i], x, V::load_i(kq.qi + i * kq.qbytes + j * V::IB));
    }
  } else {
    constexpr int64_t kPart = part_chunks<PER>();
    for (int64_t j0 = 0; j0 < chunks; j0 += kPart) {
      typename V::A part[RB];
      for (int i = 0; i < RB; ++i) part[i] = V::zero_a();
      for (int64_t j = j0; j < imin(chunks, j0 + kPart); ++j) {
        typename V::I u[PER];
        V::template unpack<PER>(FULL ? V::load_i(row + j * kChunk) : load_bytes(row + j * kChunk, avail - j * kChunk),
                                u);
        for (int i = 0; i < RB; ++i)
          part[i] = V::template dot_part<PER>(part[i], u, kq.qi + i * kq.qbytes + j * PER * V::IB);
      }
      for (int i = 0; i < RB; ++i) acc[i] = V::add_i(acc[i], V::part_to_i32(part[i]));
    }
  }
}

// dots [RB, T] int32 scratch: the integer dot products of PB positions at a time (positions_per_reduction), summed
// across lanes 4 at a time, then turned into scores a vector of positions at a time.
template <int PER, int RB, bool FULL, int NCH>
void scores_int_rows(const KeyQuery& kq, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale, float* s,
                     int64_t lds, int32_t* dots) {
  constexpr int PB = positions_per_reduction<RB>();
  constexpr int64_t kChunk = PER == 1 ? V::IB / 2 : V::IB;
  const int64_t end = k.n * k.ld, chunks = (D / PER + kChunk - 1) / kChunk;
  int64_t t = t0;
  for (; t + PB <= t1; t += PB) {
    typename V::I acc[PB * RB];
    for (int j = 0; j < PB; ++j)
      dot_int_position<PER, RB, FULL, NCH>(kq, k.data + (t + j) * k.ld, end - (t + j) * k.ld, chunks, acc + j * RB);
    if constexpr (PB == 1) {
      int32_t d[4];
      V::hsum4_i(acc[0], acc[1], acc[2], acc[3], d);
      for (int i = 0; i < 4; ++i) dots[i * k.n + t] = d[i];
    } else {
      for (int i = 0; i < RB; ++i)
        V::hsum4_i(acc[i], acc[RB + i], acc[2 * RB + i], acc[3 * RB + i], dots + i * k.n + t);
    }
  }
  for (; t < t1; ++t) {
    typename V::I acc[RB];
    dot_int_position<PER, RB, FULL, NCH>(kq, k.data + t * k.ld, end - t * k.ld, chunks, acc);
    for (int i = 0; i < RB; ++i) dots[i * k.n + t] = V::hsum_i(acc[i]);
  }
  for (int i = 0; i < RB; ++i)
    V::affine_i32(dots + i * k.n + t0, t1 - t0, scale * kq.qs[i], scale * kq.zq[i], s + i * lds + t0);
}

template <int PER, int RB>
void scores_int_rows(const KeyQuery& kq, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale, float* s,
                     int64_t lds, int32_t* dots) {
  constexpr int64_t kChunk = PER == 1 ? V::IB / 2 : V::IB;
  const int64_t chunks = (D / PER + kChunk - 1) / kChunk;
  if ((D / PER) % kChunk != 0) return scores_int_rows<PER, RB, false, 0>(kq, D, k, t0, t1, scale, s, lds, dots);
  // INT4 / INT2 rows at the usual head dims (64 to 256) are 1, 2 or 4 chunks. (INT8 rows of 4 or 8 chunks unrolled
  // measured no faster: (8, 32, 8, 128, 4096) about 5% slower, so they keep the loop.)
  switch (PER > 1 ? chunks : 0) {
    case 1: return scores_int_rows<PER, RB, true, 1>(kq, D, k, t0, t1, scale, s, lds, dots);
    case 2: return scores_int_rows<PER, RB, true, 2>(kq, D, k, t0, t1, scale, s, lds, dots);
    case 4: return scores_int_rows<PER, RB, true, 4>(kq, D, k, t0, t1, scale, s, lds, dots);
    default: return scores_int_rows<PER, RB, true, 0>(kq, D, k, t0, t1, scale, s, lds, dots);
  }
}

// Work layout of the SIMD kernels (within work_floats): fallback block, its scales / zeros (3 [T, D]); then the
// per-row arrays.
struct SimdWork {
  float *block, *sf, *zf, *rest;
  SimdWork(Work& w, int64_t n, int64_t D) {
    block = w.f;
    sf = block + n * D;
    zf = sf + n * D;
    rest = zf + n * D;
  }
};

// False (nothing written) when the page's scale / zero could reach the clamp.
template <int PER>
bool scores_int(const float* q, int64_t rows, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale,
                float* s, int64_t lds, Work& w) {
  SimdWork sw(w, k.n, D);
  V::f16_to_f32(k.scale, sw.sf, D);
  V::f16_to_f32(k.zero, sw.zf, D);
  if (!clamp_cannot_bind(sw.sf, sw.zf, D, static_cast<float>((1 << (8 / PER)) - 1))) return false;
  // QMAX: int8 query for u8 x s8; int16 for INT8 codes, small enough that sum_c |qi_c| 255 fits int32.
  const float qmax = PER == 1 ? static_cast<float>(imin(32767, 2147483647 / (255 * D))) : 127.0f;
  constexpr int64_t kChannelsPerChunk = PER == 1 ? V::IB / 2 : PER * V::IB;
  const int64_t qbytes = round_up(D, kChannelsPerChunk) * (PER == 1 ? 2 : 1);
  // rest: qp [D] | tmp [qbytes] | 4 rows of qi | qs [4] | zq [4] | dots [4, T]
  float* qp = sw.rest;
  float* tmp = qp + round_up(D, 16);
  auto* qi = reinterpret_cast<int8_t*>(tmp + round_up(qbytes, 64) / 4);
  float* qs = reinterpret_cast<float*>(qi + 4 * round_up(qbytes, 64));
  KeyQuery kq{qi, qbytes, qs, qs + 4};
  auto* dots = reinterpret_cast<int32_t*>(qs + 8);
  for_row_blocks(rows, [&](auto rb, int64_t r) {
    prepare_key_query<PER>(q + r * D, decltype(rb)::value, D, sw.sf, sw.zf, qmax, tmp, qp, kq);
    scores_int_rows<PER, decltype(rb)::value>(kq, D, k, t0, t1, scale, s + r * lds, lds, dots);
  });
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Values from their codes.

// pv[r, c..c + NV W) for RB rows: sum_t w[r, t] code_t + zs[r] (the channels lie in one group). The codes of 2W
// channels are converted to FP32 at once (codes_to_float), W for an odd last vector.
template <int PER, int RB, int NV>
void values_int_chunk(const float* wg, int64_t ldw, const float* zs, int64_t ldz, int64_t D, const Rows& v,
                      int64_t t0, int64_t t1, int64_t c, float* pv) {
  typename V::F acc[RB][NV];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V::zero();
  const uint8_t* base = v.data + c / PER;
  for (int64_t t = t0; t < t1; ++t) {
    typename V::F x[NV];
    for (int j = 0; j + 2 <= NV; j += 2) V::template codes_to_float<PER, 2>(base + t * v.ld + j * V::W / PER, x + j);
    if constexpr (NV % 2 == 1) V::template codes_to_float<PER, 1>(base + t * v.ld + (NV - 1) * V::W / PER, x + NV - 1);
    for (int i = 0; i < RB; ++i) {
      const typename V::F b = V::set1(wg[i * ldw + t]);
      for (int j = 0; j < NV; ++j) acc[i][j] = V::fmadd(b, x[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    const typename V::F z = V::set1(zs[i * ldz]);
    for (int j = 0; j < NV; ++j) V::store(pv + i * D + c + j * V::W, V::add(acc[i][j], z));
  }
}

// INT4 / INT2, strided channels: one load of W code bytes as u32 lanes holds PER codes per lane; field k of lane j
// is channel c + PER j + k. A pass takes the fields K0 and K0 + 1 of NS spans of PER W channels (c, c + PER W, ...;
// 2 RB NS accumulators, enough independent FMA chains for few rows); PER / 2 passes cover the spans, and the sums
// are interleaved back to natural order once at the end. Per position this is one widening load and 2 shifts /
// masks / conversions per 2W channels (the unpack to bytes of codes_to_float and its extra widenings are not
// needed). Requires PER W | D and PER W | VG (the channels of a span share a group; w, zs: those of the group of
// each span, ldw / ldz between rows).
template <int PER, int RB, int K0, int NS>
void values_int_strided(const float* w, int64_t ldw, int64_t T, const float* zs, int64_t ldz, int64_t D, int64_t VG,
                        const Rows& v, int64_t t0, int64_t t1, int64_t c, float* pv) {
  constexpr int kBits = 8 / PER;
  constexpr int64_t kSpan = PER * V::W;
  const float* wg[NS];
  for (int n = 0; n < NS; ++n) wg[n] = w + (c + n * kSpan) / VG * T;
  typename V::F acc[RB][NS][2];
  for (int i = 0; i < RB; ++i)
    for (int n = 0; n < NS; ++n) acc[i][n][0] = acc[i][n][1] = V::zero();
  const uint8_t* base = v.data + c / PER;
  for (int64_t t = t0; t < t1; ++t) {
    for (int n = 0; n < NS; ++n) {
      const typename V::I x = V::load_u8_u32(base + t * v.ld + n * V::W);
      const typename V::F a = V::template field<K0 * kBits, kBits>(x);
      const typename V::F b = V::template field<(K0 + 1) * kBits, kBits>(x);
      for (int i = 0; i < RB; ++i) {
        const typename V::F wt = V::set1(wg[n][i * ldw + t]);
        acc[i][n][0] = V::fmadd(wt, a, acc[i][n][0]);
        acc[i][n][1] = V::fmadd(wt, b, acc[i][n][1]);
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int n = 0; n < NS; ++n) {
      const int64_t cn = c + n * kSpan;
      const typename V::F z = V::set1(zs[cn / VG + i * ldz]);
      if constexpr (PER == 2) {
        V::store_interleaved(pv + i * D + cn, V::add(acc[i][n][0], z), V::add(acc[i][n][1], z));
      } else {
        alignas(64) float pair[2 * V::W];
        V::store_interleaved(pair, V::add(acc[i][n][0], z), V::add(acc[i][n][1], z));
        for (int j = 0; j < V::W; ++j) std::memcpy(pv + i * D + cn + PER * j + K0, pair + 2 * j, 2 * sizeof(float));
      }
    }
}

// Spans of PER W channels per pass of values_int_strided: 2 RB NS accumulators, 8 to 12.
template <int RB>
constexpr int value_spans() {
  return value_vectors<RB>() / 2;
}

template <int PER, int RB>
void values_int_rows(const float* w, const float* zs, int64_t groups, int64_t T, int64_t D, int64_t VG,
                     const Rows& v, int64_t t0, int64_t t1, float* pv) {
  // w [RB][groups][T], zs [RB][groups]
  if constexpr (PER > 1) {
    constexpr int64_t kSpan = PER * V::W;
    constexpr int kNS = value_spans<RB>();
    if (D % kSpan == 0 && VG % kSpan == 0) {
      auto pass = [&](auto ns, int64_t c) {
        constexpr int NS = decltype(ns)::value;
        values_int_strided<PER, RB, 0, NS>(w, groups * T, T, zs, groups, D, VG, v, t0, t1, c, pv);
        if constexpr (PER == 4)
          values_int_strided<PER, RB, 2, NS>(w, groups * T, T, zs, groups, D, VG, v, t0, t1, c, pv);
      };
      int64_t c = 0;
      for (; c + kNS * kSpan <= D; c += kNS * kSpan) pass(std::integral_constant<int, kNS>{}, c);
      for (; c < D; c += kSpan) pass(std::integral_constant<int, 1>{}, c);
      return;
    }
  }
  // Chunks of NV W channels inside one group: value_vectors<RB>() where the group size allows, else 2 or 1.
  constexpr int kNV = value_vectors<RB>();
  const int64_t step = VG % (kNV * V::W) == 0 ? kNV * V::W : VG % (2 * V::W) == 0 ? 2 * V::W : V::W;
  for (int64_t c = 0; c < D; c += step) {
    const int64_t g = c / VG;
    const float* wg = w + g * T;
    if (step == kNV * V::W) values_int_chunk<PER, RB, kNV>(wg, groups * T, zs + g, groups, D, v, t0, t1, c, pv);
    else if (step == 2 * V::W) values_int_chunk<PER, RB, 2>(wg, groups * T, zs + g, groups, D, v, t0, t1, c, pv);
    else values_int_chunk<PER, RB, 1>(wg, groups * T, zs + g, groups, D, v, t0, t1, c, pv);
  }
}

// False (nothing written) when the scale / zero of a position read could reach the clamp.
template <int PER>
bool values_int(const float* p, int64_t ldp, int64_t rows, int64_t D, int64_t VG, const Rows& v, int64_t t0,
                int64_t t1, float* pv, Work& work) {
  SimdWork sw(work, v.n, D);
  const int64_t groups = D / VG, T = v.n;
  // Scales / zeros of positions [t0, t1) as FP32 [t1 - t0, groups] (sf, zf), transposed to [groups, T] (st, zt;
  // one group: sf, zf as they are), then w [4][groups][T] and zs [4][groups] in rest.
  float* st = sw.rest;
  float* zt = st + groups * T;
  float* w = zt + groups * T;
  float* zs = w + 4 * groups * T;
  V::f16_to_f32(v.scale + t0 * groups, sw.sf, (t1 - t0) * groups);
  V::f16_to_f32(v.zero + t0 * groups, sw.zf, (t1 - t0) * groups);
  if (!clamp_cannot_bind(sw.sf, sw.zf, (t1 - t0) * groups, static_cast<float>((1 << (8 / PER)) - 1))) return false;
  if (groups > 1)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < groups; ++g) {
        st[g * T + t] = sw.sf[(t - t0) * groups + g];
        zt[g * T + t] = sw.zf[(t - t0) * groups + g];
      }
  for_row_blocks(rows, [&](auto rb, int64_t r) {
    constexpr int RB = decltype(rb)::value;
    for (int64_t i = 0; i < RB; ++i) {
      const float* pr = p + (r + i) * ldp;
      for (int64_t g = 0; g < groups; ++g) {
        float* wr = w + (i * groups + g) * T;
        const float* sg = groups > 1 ? st + g * T + t0 : sw.sf;  // [t - t0]
        const float* zg = groups > 1 ? zt + g * T + t0 : sw.zf;
        typename V::F z = V::zero();
        int64_t t = t0;
        for (; t + V::W <= t1; t += V::W) {
          const typename V::F pt = V::load(pr + t);
          V::store(wr + t, V::mul(pt, V::load(sg + (t - t0))));
          z = V::fmadd(pt, V::load(zg + (t - t0)), z);
        }
        if (t < t1) {
          const int n = static_cast<int>(t1 - t);
          const typename V::F pt = V::load_n(pr + t, n);
          V::store_n(wr + t, V::mul(pt, V::load_n(sg + (t - t0), n)), n);
          z = V::fmadd(pt, V::load_n(zg + (t - t0), n), z);
        }
        zs[i * groups + g] = V::hsum(z);
      }
    }
    values_int_rows<PER, RB>(w, zs, groups, T, D, VG, v, t0, t1, pv + r * D);
  });
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// The table.

void simd_scores(const float* q, int64_t rows, int64_t D, const Rows& k, int64_t t0, int64_t t1, float scale,
                 float* s, int64_t lds, Work& w) {
  switch (k.elem) {
    case Elem::F32: return scores_float<Elem::F32>(q, rows, D, k, t0, t1, scale, s, lds);
    case Elem::F16: return scores_float<Elem::F16>(q, rows, D, k, t0, t1, scale, s, lds);
    case Elem::BF16: return scores_float<Elem::BF16>(q, rows, D, k, t0, t1, scale, s, lds);
    case Elem::U8:
      if (scores_int<1>(q, rows, D, k, t0, t1, scale, s, lds, w)) return;
      break;
    case Elem::U4:
      if (scores_int<2>(q, rows, D, k, t0, t1, scale, s, lds, w)) return;
      break;
    case Elem::U2:
      if (scores_int<4>(q, rows, D, k, t0, t1, scale, s, lds, w)) return;
      break;
  }
  // The clamp could bind: dequantized with it (as the scalar path), then as FP32 rows.
  SimdWork sw(w, k.n, D);
  const float* f = kvprec::cpu::block_to_float(k, D, 0, true, sw.block, sw.sf, sw.zf);
  const Rows rf{Elem::F32, reinterpret_cast<const uint8_t*>(f), D * 4, k.n, nullptr, nullptr};
  scores_float<Elem::F32>(q, rows, D, rf, t0, t1, scale, s, lds);
}

void simd_values(const float* p, int64_t ldp, int64_t rows, int64_t D, int64_t VG, const Rows& v, int64_t t0,
                 int64_t t1, float* pv, Work& w) {
  switch (v.elem) {
    case Elem::F32: return values_float<Elem::F32>(p, ldp, rows, D, v, t0, t1, pv);
    case Elem::F16: return values_float<Elem::F16>(p, ldp, rows, D, v, t0, t1, pv);
    case Elem::BF16: return values_float<Elem::BF16>(p, ldp, rows, D, v, t0, t1, pv);
    default: break;
  }
  if (VG % V::W == 0) {  // else a W-channel chunk could straddle two groups
    switch (v.elem) {
      case Elem::U8:
        if (values_int<1>(p, ldp, rows, D, VG, v, t0, t1, pv, w)) return;
        break;
      case Elem::U4:
        if (values_int<2>(p, ldp, rows, D, VG, v, t0, t1, pv, w)) return;
        break;
      default:
        if (values_int<4>(p, ldp, rows, D, VG, v, t0, t1, pv, w)) return;
        break;
    }
  }
  SimdWork sw(w, v.n, D);
  const float* f = kvprec::cpu::block_to_float(v, D, VG, false, sw.block, sw.sf, sw.zf);
  const Rows rf{Elem::F32, reinterpret_cast<const uint8_t*>(f), D * 4, v.n, nullptr, nullptr};
  values_float<Elem::F32>(p, ldp, rows, D, rf, t0, t1, pv);
}

constexpr kvprec::cpu::Kernels kSimdKernels = {&simd_scores, &simd_values, &simd_max, &simd_exp_sum};

}  // namespace
