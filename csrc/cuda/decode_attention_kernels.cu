// Flash-decoding attention over a mixed-precision paged KV cache (semantics: decode_attention_kernels.cuh and
// kvprec/ops/reference/decode_attention.py). Shapes: B batch, Hkv KV heads, G = Hq/Hkv query heads per KV head,
// Q queries, D head_dim, T block_size, NB sealed blocks, TL tail tokens, N = NB*T + TL, GQ = G*Q rows.
//
// Design
// ------
// Decode reads every cached byte once and does little arithmetic per byte, so the kernel is built around the
// bytes: fetch each (b, KV head)'s pages once for all G query heads, keep many bytes in flight per SM, and spend
// the ALU budget on dequantization, not on the dot products (tensor cores do those).
//
// Kernel 1, decode_split_kernel<D, T>: grid (B*Hkv*R, S), 128 threads = 4 warps.
//   A CTA owns one (b, KV head), one tile of 16 rows (row = (query head g, query i), R = ceil(GQ/16) tiles;
//   GQ <= 16 for decode, so K/V are read once: GQA without repeat_kv), and a contiguous range of blocks (the
//   split; blocks wholly before every query's sliding window are in no split). The range is cut into 16-token
//   chunks (block_size a power of two >= 16, so a chunk never straddles blocks or tiers); warp w takes chunks
//   w, w+4, ... and runs its own online softmax over them (no CTA barrier in the main loop). At the end the four
//   warps are merged through shared memory and the CTA writes one FP32 partial (m, l, acc[D]) per row.
//
//   Scores and P·V are mma.sync.m16n8k16 in q's dtype (fp16/bf16) with FP32 accumulators: M = the 16 rows,
//   scores N = 8 tokens x 2 (the chunk), K = 16 channels x D/16 steps; P·V: K = the 16 tokens, N = 8 channels x
//   D/8 tiles. Per thread (g = lane/4, c = lane%4):
//     - Q fragments of rows g and g+8: in shared memory in a thread-private order (each thread reads back only
//       what it wrote: no barrier, no bank conflict), D/2 bytes per row;
//     - scores s[2][4] (rows g, g+8; tokens 8n + 2c, 2c+1), the running max m and sum l of its two rows;
//     - the output accumulator o[D/8][4] FP32 (rows g, g+8 x channels (2c)*D/8 + n and (2c+1)*D/8 + n).
//   The reduction axes are permuted so that each thread's operands are contiguous in memory, which is what makes
//   16-byte loads of packed codes possible: in the score mma thread c supplies channels [c*D/4, (c+1)*D/4) of K
//   rows g and g+8 (k-step kk reads channels c*D/4 + 4kk .. +3; Q uses the same permutation, and a dot product
//   does not care about the order of its terms); in P·V thread (r = lane/4, c) supplies channels
//   [r*D/8, (r+1)*D/8) of tokens 2c, 2c+1, 2c+8, 2c+9 (output column n of tile t is channel n*D/8 + t, undone
//   when the partial is written).
//
//   Bytes: global -> shared with cp.async (16 B per copy, coalesced: consecutive lanes copy consecutive 16 B of
//   a page), into a per-warp ring of `stages` slots of one half-chunk each (K of chunk c, then V of chunk c).
//   A slot holds the half-chunk exactly as stored (packed codes, then the FP16 scale/zero it needs), so the
//   traffic is the packed size; a tier's branch is chosen per chunk from the block table (staged in shared
//   memory once per CTA). While a warp computes one half-chunk, stages-1 more are in flight (stages = 2..4,
//   as many as fit in the shared memory left by the CTAs per SM that the registers allow: stage_budget).
//   Shared -> registers: each thread reads its own contiguous run (up to 16 B per load) and dequantizes in
//   registers with the formats' formula in FP32 (zero >= -65504 and code * scale >= 0: no lower clamp),
//       x' = min(code * scale + zero, 65504)          (formats.h; code * scale is exact in FP32, so one fma
//                                                       rounds exactly as the reference's multiply-then-add),
//   then rounds x' to q's dtype for the tensor cores (as the Triton kernel and flash attention do). Keys use
//   their per-channel scale/zero of the block, values the per-(token, group) ones. FP16/BF16 tiers are fed
//   as stored when they match q's dtype. Slots are laid out as rows of 16-byte units with an XOR swizzle of the
//   unit index (swizzle<U>) chosen so that the cp.async writes, the K reads and the V reads are all free of
//   bank conflicts for every tier and head_dim (checked exhaustively off-line by a small simulator).
//
//   Online softmax (per warp and row; -inf maxima shift by 0 so that no (-inf) - (-inf) appears):
//       m' = max(m, max_t s_t);  p_t = e^(s_t - m');  l' = l e^(m - m') + sum_t p_t;  o' = o e^(m - m') + p V
//   p is rounded to q's dtype for the P·V mma; l sums the FP32 p. With block mass each chunk also stores
//   (m', sum_t p_t) per row: its mass is sum_t p_t e^(m' - lse), summed over the chunks of a block in kernel 2.
//
// Kernel 2, decode_reduce_kernel<D, T>: one warp per (b, KV head, row), combining the S split partials,
//       m* = max_s m_s;  l = sum_s l_s e^(m_s - m*);  out = sum_s acc_s e^(m_s - m*) / l;  lse = m* + log l,
//   rounding out once to q's dtype, and summing the per-chunk mass terms of each block (blocks before the window
//   were never read: mass 0). Rows with no allowed key: out 0, lse -inf, mass 0.
//
// Split count: as the Triton launcher, about 4 CTAs per SM (SM count queried once per device) over the live
// blocks, at most 1024 blocks per split (the block table of a split is staged in shared memory).
//
// A block-table entry naming a tier without a pool or a page outside its pool cannot be reported from the
// kernel without a host synchronisation; the kernel reads nothing for it and makes that row's out/lse NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "decode_attention_kernels.cuh"

namespace kvprec::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 16;              // tokens per chunk: the M of one score mma pair / the K of one P·V mma
constexpr int kMaxSplitBlocks = 1024;   // block-table entries staged in shared memory per CTA
// Shared memory for the per-warp rings of one CTA (the pipeline depth follows from it): what leaves room for the
// CTAs per SM that the registers allow (ptxas: ~118 / 161 / 254 registers at D = 64 / 128 / 256, i.e. 4 / 3 / 2
// CTAs of 128 threads in 228 KB).
constexpr int stage_budget(int d) { return d <= 64 ? 48 * 1024 : d <= 128 ? 64 * 1024 : 96 * 1024; }
constexpr int kMaxStages = 4;
constexpr int kCtasPerSm = 4;           // the split heuristic's target, as _PROGRAMS_PER_SM in the Triton launcher
constexpr int kMaxDevices = 64;
constexpr uint32_t kPoison = 7;         // block-table code: tier without a pool or page out of range
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kFp16Max = 65504.0f;

// Formats (tier ids; the tail uses the id of its float type).
enum : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3, kI4 = 4, kI2 = 5 };

template <int F>
struct Fmt {
  static constexpr int bits = F == kF32 ? 32 : (F == kF16 || F == kBF16) ? 16 : F == kI8 ? 8 : F == kI4 ? 4 : 2;
  static constexpr bool integer = F >= kI8;
};

// One half-chunk (16 rows of K or V) of format F at head_dim D, as staged in shared memory.
template <int D, int F>
struct Geo {
  static constexpr int RB = D * Fmt<F>::bits / 8;  // bytes of one row (token)
  static constexpr int U = RB / 16;                // 16-byte units per row (>= 1: D >= 64)
  static constexpr int QB = RB / 4;                // K: bytes of a row one thread reads (a quarter)
  static constexpr int EB = RB / 8;                // V: bytes of a row one thread reads (an eighth)
};

// Bytes of the staged data of a half-chunk; integer tiers' scale/zero follow it in the slot.
template <int D, int F>
constexpr int kDataBytes = kChunk * Geo<D, F>::RB;

// Physical 16-byte unit of logical unit z = row * U + x of a region with U units per row. Only bits >= 3 of z
// feed the XOR, so 8 consecutive units (one 8-lane phase of cp.async writes) stay conflict-free; the terms were
// found by exhaustive search over the K read pattern (rows g, g+8, quarter c) and the V read pattern (rows 2c,
// 2c+1, 2c+8, 2c+9, eighth r) for U = 1..64.
template <int U>
__device__ __forceinline__ int swizzle(int z) {
  if constexpr (U >= 8) {
    return z ^ (((z >> 3) ^ (z >> 6)) & 7);
  } else if constexpr (U == 4) {
    return z ^ ((z >> 2) & 6);
  } else if constexpr (U == 2) {
    return z ^ ((z >> 2) & 2);
  } else {
    return z;
  }
}

template <int U>
__device__ __forceinline__ int region_offset(int row, int byte) {
  return swizzle<U>(row * U + (byte >> 4)) * 16 + (byte & 15);
}

// ---------------------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !full (nothing is read then).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(full ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// wait_group takes an immediate; the pipeline depth is a runtime value in [2, kMaxStages].
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  if (n <= 0) {
    cp_async_wait<0>();
  } else if (n == 1) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<2>();
  }
}

// N bytes (2, 4, 8 or 16) of shared memory into 32-bit words (a 2-byte load fills the low half of w[0]).
template <int N>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t* w) {
  if constexpr (N == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else if constexpr (N == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(N == 2, "load_words: 2, 4, 8 or 16 bytes");
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

__device__ __forceinline__ float half_lo(uint32_t w) { return __half2float(__ushort_as_half(w & 0xFFFFu)); }
__device__ __forceinline__ float half_hi(uint32_t w) { return __half2float(__ushort_as_half(w >> 16)); }

// Element j of a run of packed words of format F, as FP32; integer formats give the code (exact).
template <int F>
__device__ __forceinline__ float element(const uint32_t* w, int j) {
  if constexpr (F == kF32) {
    return __uint_as_float(w[j]);
  } else if constexpr (F == kF16) {
    return (j & 1) ? half_hi(w[j >> 1]) : half_lo(w[j >> 1]);
  } else if constexpr (F == kBF16) {
    return __uint_as_float((j & 1) ? (w[j >> 1] & 0xFFFF0000u) : (w[j >> 1] << 16));
  } else {
    constexpr int bits = Fmt<F>::bits;
    const uint32_t code = (w[(j * bits) >> 5] >> ((j * bits) & 31)) & ((1u << bits) - 1u);
    return __uint_as_float(0x4B000000u | code) - 8388608.0f;  // 2^23 + code, exactly, minus 2^23
  }
}

// The formats' dequantization (formats.h): code * scale + zero in FP32, clamped to the FP16 range. code * scale
// is exact (<= 8 + 11 significant bits), so the fma rounds once, exactly as the multiply-then-add of the reference.
__device__ __forceinline__ float dequant(float code, float scale, float zero) {
  return fminf(fmaf(code, scale, zero), kFp16Max);
}

// q's dtype: packing of two FP32 into one mma operand register, and the mma itself.
template <typename T>
struct MmaType;

template <>
struct MmaType<__half> {
  static constexpr int native = kF16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaType<__nv_bfloat16> {
  static constexpr int native = kBF16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments (by value, __grid_constant__)

struct SplitArgs {
  DecodeAttentionParams p;
  float* m_part;    // [B*Hkv, S, GQ]
  float* l_part;    // [B*Hkv, S, GQ]
  float* acc_part;  // [B*Hkv, S, GQ, D]
  float* blk_m;     // [B*Hkv, GQ, NCH] or nullptr (NCH: 16-token chunks of the whole cache)
  float* blk_s;
  int gq, group, row_tiles, num_splits, blocks_per_split, first_block, nbt, nch, lg_cpb, tail_chunks, seq_len;
  int stages, slot_bytes, table_bytes, q_bytes, lg_group, ngroups;
};

struct ReduceArgs {
  const float* m_part;
  const float* l_part;
  const float* acc_part;
  const float* blk_m;
  const float* blk_s;
  void* out;
  float* lse;
  float* mass;
  int64_t rows;  // B*Hkv*GQ
  int gq, group, num_queries, kv_heads, q_heads, num_splits, nbt, num_blocks, first_block, cpb, tail_chunks, nch;
};

// ---------------------------------------------------------------------------------------------------------
// Global -> shared: one half-chunk per call, all 32 lanes of a warp.

// kChunk rows of U units: row r from src + r * row_stride (bytes); rows >= valid_rows are zero-filled.
template <int U>
__device__ __forceinline__ void copy_rows(uint32_t dst, const uint8_t* src, int64_t row_stride, int valid_rows,
                                          int lane) {
  constexpr int kUnits = kChunk * U;
#pragma unroll
  for (int k0 = 0; k0 < kUnits; k0 += 32) {
    const int k = k0 + lane;
    if (kUnits % 32 == 0 || k < kUnits) {
      const int row = k / U;
      const bool ok = row < valid_rows;
      cp_async16(dst + swizzle<U>(k) * 16, ok ? src + row * row_stride + (k % U) * 16 : src, ok);
    }
  }
}

// One row of U units, swizzled as a region of U units per row (keys' per-channel scale or zero).
template <int U>
__device__ __forceinline__ void copy_row(uint32_t dst, const uint8_t* src, int lane) {
#pragma unroll
  for (int k0 = 0; k0 < U; k0 += 32) {
    const int k = k0 + lane;
    if (U % 32 == 0 || k < U) cp_async16(dst + swizzle<U>(k) * 16, src + k * 16, true);
  }
}

__device__ __forceinline__ void copy_linear(uint32_t dst, const uint8_t* src, int units, int lane) {
  for (int k = lane; k < units; k += 32) cp_async16(dst + k * 16, src + k * 16, true);
}

// Sealed chunk `sub` of page `page` of tier F: the data rows, then (integer tiers) keys' scale[D], zero[D] or
// values' scale[16, D/G], zero[16, D/G].
template <int D, int F>
__device__ __forceinline__ void issue_sealed(const SplitArgs& a, uint32_t dst, bool is_v, int64_t page, int sub,
                                             int lane) {
  using G = Geo<D, F>;
  const DecodePool& pool = a.p.pools[F];
  const int64_t row0 = page * a.p.block_size + int64_t{sub} * kChunk;  // first pool row (token) of the chunk
  copy_rows<G::U>(dst, static_cast<const uint8_t*>(is_v ? pool.v : pool.k) + row0 * G::RB, G::RB, kChunk, lane);
  if constexpr (Fmt<F>::integer) {
    const uint32_t meta = dst + kDataBytes<D, F>;
    if (!is_v) {
      copy_row<D / 8>(meta, reinterpret_cast<const uint8_t*>(pool.k_scale + page * D), lane);
      copy_row<D / 8>(meta + 2 * D, reinterpret_cast<const uint8_t*>(pool.k_zero + page * D), lane);
    } else {
      const int64_t off = row0 * a.ngroups;  // halves; 16 rows of ngroups halves = 2 * ngroups units
      copy_linear(meta, reinterpret_cast<const uint8_t*>(pool.v_scale + off), 2 * a.ngroups, lane);
      copy_linear(meta + 32 * a.ngroups, reinterpret_cast<const uint8_t*>(pool.v_zero + off), 2 * a.ngroups, lane);
    }
  }
}

// Tail chunk `sub` of (b, h) in float format F; rows past the tail are zero-filled (a zero V row times p = 0
// stays 0, whereas stale shared memory could hold NaN bit patterns).
template <int D, int F>
__device__ __forceinline__ void issue_tail(const SplitArgs& a, uint32_t dst, bool is_v, int b, int h, int sub,
                                           int lane) {
  using G = Geo<D, F>;
  constexpr int E = Fmt<F>::bits / 8;
  const int64_t first = int64_t{sub} * kChunk;
  const int64_t off = (b * a.p.tail_stride_b + h * a.p.tail_stride_h + first * a.p.tail_stride_t) * E;
  const uint8_t* base = static_cast<const uint8_t*>(is_v ? a.p.tail_v : a.p.tail_k) + off;
  copy_rows<G::U>(dst, base, a.p.tail_stride_t * E, min(kChunk, a.p.tail_len - sub * kChunk), lane);
}

// Which chunk a warp-local chunk index is: format, page, position. Uniform across the warp.
struct Chunk {
  int fmt;       // format (tier id; kPoison: unreadable table entry)
  int64_t page;  // sealed chunks
  int sub;       // chunk within its block (or within the tail)
  int gid;       // chunk index in the whole cache (block-mass terms)
  int t0;        // position of its first token
  bool tail;
};

__device__ __forceinline__ Chunk describe(const SplitArgs& a, const uint32_t* table, int k, int n_sealed, int j_lo) {
  const int cpb = 1 << a.lg_cpb;
  const int jj = k >> a.lg_cpb;
  Chunk ch;
  if (jj < n_sealed) {
    const uint32_t e = table[jj];
    const int j = j_lo + jj;
    ch.fmt = static_cast<int>(e & 7u);
    ch.page = static_cast<int64_t>(e >> 3);
    ch.sub = k & (cpb - 1);
    ch.gid = j * cpb + ch.sub;
    ch.t0 = j * a.p.block_size + ch.sub * kChunk;
    ch.tail = false;
  } else {
    ch.sub = k - n_sealed * cpb;
    ch.fmt = static_cast<int>(a.p.tail_type);
    ch.page = 0;
    ch.gid = a.p.num_blocks * cpb + ch.sub;
    ch.t0 = a.p.num_blocks * a.p.block_size + ch.sub * kChunk;
    ch.tail = true;
  }
  return ch;
}

template <int D>
__device__ __forceinline__ void issue(const SplitArgs& a, uint32_t dst, const Chunk& ch, bool is_v, int b, int h,
                                      int lane) {
  if (ch.tail) {
    switch (ch.fmt) {
      case kF32: issue_tail<D, kF32>(a, dst, is_v, b, h, ch.sub, lane); break;
      case kF16: issue_tail<D, kF16>(a, dst, is_v, b, h, ch.sub, lane); break;
      default: issue_tail<D, kBF16>(a, dst, is_v, b, h, ch.sub, lane); break;
    }
    return;
  }
  switch (ch.fmt) {
    case kF32: issue_sealed<D, kF32>(a, dst, is_v, ch.page, ch.sub, lane); break;
    case kF16: issue_sealed<D, kF16>(a, dst, is_v, ch.page, ch.sub, lane); break;
    case kBF16: issue_sealed<D, kBF16>(a, dst, is_v, ch.page, ch.sub, lane); break;
    case kI8: issue_sealed<D, kI8>(a, dst, is_v, ch.page, ch.sub, lane); break;
    case kI4: issue_sealed<D, kI4>(a, dst, is_v, ch.page, ch.sub, lane); break;
    case kI2: issue_sealed<D, kI2>(a, dst, is_v, ch.page, ch.sub, lane); break;
    default: break;  // poisoned entry: nothing is read
  }
}

// ---------------------------------------------------------------------------------------------------------
// Shared -> registers -> tensor cores.

// Scores s[n][.] += Q K^T of one staged K half-chunk of format F: thread (g, c) reads rows g and g+8, bytes
// [c*QB, (c+1)*QB) (channels [c*D/4, (c+1)*D/4)); k-step kk covers channels c*D/4 + 4kk .. +3.
template <int D, int F, typename T>
__device__ __forceinline__ void chunk_scores(const uint8_t* slot, const uint4* qs, float (&s)[2][4], int lane) {
  using G = Geo<D, F>;
  using M = MmaType<T>;
  constexpr int kLoadBytes = G::QB < 16 ? G::QB : 16;
  constexpr int kLoads = G::QB / kLoadBytes;
  constexpr int kWords = kLoadBytes / 4;
  constexpr int kKkPerLoad = kLoadBytes * 8 / Fmt<F>::bits / 4;
  static_assert(kLoadBytes >= 4 && kKkPerLoad >= 1, "chunk_scores: a load covers whole k-steps");
  const int g = lane >> 2, c = lane & 3;
  uint4 qlo = make_uint4(0, 0, 0, 0), qhi = qlo, msc = qlo, mze = qlo;
#pragma unroll
  for (int v = 0; v < kLoads; ++v) {
    uint32_t w[2][kWords];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      load_words<kLoadBytes>(slot + region_offset<G::U>(n * 8 + g, c * G::QB + v * kLoadBytes), w[n]);
    }
#pragma unroll
    for (int kl = 0; kl < kKkPerLoad; ++kl) {
      const int kk = v * kKkPerLoad + kl;
      if ((kk & 1) == 0) {  // Q (rows g, g+8) and key metadata come 8 channels (two k-steps) per 16-byte load
        qlo = qs[(kk >> 1) * 64 + lane];
        qhi = qs[(kk >> 1) * 64 + 32 + lane];
        if constexpr (Fmt<F>::integer) {
          const uint8_t* meta = slot + kDataBytes<D, F>;
          const int unit = swizzle<D / 8>(c * (D / 32) + (kk >> 1)) * 16;
          msc = *reinterpret_cast<const uint4*>(meta + unit);
          mze = *reinterpret_cast<const uint4*>(meta + 2 * D + unit);
        }
      }
      const bool odd = kk & 1;
      const uint32_t a[4] = {odd ? qlo.z : qlo.x, odd ? qhi.z : qhi.x, odd ? qlo.w : qlo.y, odd ? qhi.w : qhi.y};
      float sc[4] = {}, ze[4] = {};
      if constexpr (Fmt<F>::integer) {
        const uint32_t s01 = odd ? msc.z : msc.x, s23 = odd ? msc.w : msc.y;
        const uint32_t z01 = odd ? mze.z : mze.x, z23 = odd ? mze.w : mze.y;
        sc[0] = half_lo(s01), sc[1] = half_hi(s01), sc[2] = half_lo(s23), sc[3] = half_hi(s23);
        ze[0] = half_lo(z01), ze[1] = half_hi(z01), ze[2] = half_lo(z23), ze[3] = half_hi(z23);
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t b0, b1;
        if constexpr (F == M::native) {
          b0 = w[n][2 * kl];
          b1 = w[n][2 * kl + 1];
        } else {
          float x[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            x[i] = element<F>(w[n], 4 * kl + i);
            if constexpr (Fmt<F>::integer) x[i] = dequant(x[i], sc[i], ze[i]);
          }
          b0 = M::pack(x[0], x[1]);
          b1 = M::pack(x[2], x[3]);
        }
        M::mma(s[n], a, b0, b1);
      }
    }
  }
}

// o[t][.] += P V of one staged V half-chunk of format F: thread (r, c) reads tokens 2c, 2c+1, 2c+8, 2c+9, bytes
// [r*EB, (r+1)*EB) (channels [r*D/8, (r+1)*D/8)); channel r*D/8 + t feeds output tile t.
template <int D, int F, typename T>
__device__ __forceinline__ void chunk_pv(const uint8_t* slot, const uint32_t (&pa)[4], float (&o)[D / 8][4],
                                         int lane, int ngroups, int lg_group) {
  using G = Geo<D, F>;
  using M = MmaType<T>;
  constexpr int kLoadBytes = G::EB < 16 ? G::EB : 16;
  constexpr int kLoads = G::EB / kLoadBytes;
  constexpr int kWords = kLoadBytes >= 4 ? kLoadBytes / 4 : 1;
  constexpr int kChPerLoad = kLoadBytes * 8 / Fmt<F>::bits;
  const int r = lane >> 2, c = lane & 3;
  const int rows[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
  // Values' groups: a thread's D/8 channels span one group when G >= D/8, else one every G channels.
  const int gmask = min(1 << lg_group, D / 8) - 1;
  float sc[4] = {}, ze[4] = {};
#pragma unroll
  for (int v = 0; v < kLoads; ++v) {
    uint32_t w[4][kWords];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      load_words<kLoadBytes>(slot + region_offset<G::U>(rows[k], r * G::EB + v * kLoadBytes), w[k]);
    }
#pragma unroll
    for (int j = 0; j < kChPerLoad; ++j) {
      const int t = v * kChPerLoad + j;
      if constexpr (Fmt<F>::integer) {
        if (t == 0 || (t & gmask) == 0) {
          const uint16_t* vs = reinterpret_cast<const uint16_t*>(slot + kDataBytes<D, F>);
          const uint16_t* vz = vs + kChunk * ngroups;
          const int grp = (r * (D / 8) + t) >> lg_group;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            sc[k] = __half2float(__ushort_as_half(vs[rows[k] * ngroups + grp]));
            ze[k] = __half2float(__ushort_as_half(vz[rows[k] * ngroups + grp]));
          }
        }
      }
      uint32_t b0, b1;
      if constexpr (F == M::native) {  // as stored: interleave the halves of two token rows
        const uint32_t sel = (j & 1) ? 0x7632u : 0x5410u;
        b0 = __byte_perm(w[0][j >> 1], w[1][j >> 1], sel);
        b1 = __byte_perm(w[2][j >> 1], w[3][j >> 1], sel);
      } else {
        float x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          x[k] = element<F>(w[k], j);
          if constexpr (Fmt<F>::integer) x[k] = dequant(x[k], sc[k], ze[k]);
        }
        b0 = M::pack(x[0], x[1]);
        b1 = M::pack(x[2], x[3]);
      }
      M::mma(o[t], pa, b0, b1);
    }
  }
}

template <int D, typename T>
__device__ __forceinline__ void scores_dispatch(int fmt, const uint8_t* slot, const uint4* qs, float (&s)[2][4],
                                                int lane) {
  switch (fmt) {
    case kF32: chunk_scores<D, kF32, T>(slot, qs, s, lane); break;
    case kF16: chunk_scores<D, kF16, T>(slot, qs, s, lane); break;
    case kBF16: chunk_scores<D, kBF16, T>(slot, qs, s, lane); break;
    case kI8: chunk_scores<D, kI8, T>(slot, qs, s, lane); break;
    case kI4: chunk_scores<D, kI4, T>(slot, qs, s, lane); break;
    default: chunk_scores<D, kI2, T>(slot, qs, s, lane); break;
  }
}

template <int D, typename T>
__device__ __forceinline__ void pv_dispatch(int fmt, const uint8_t* slot, const uint32_t (&pa)[4],
                                            float (&o)[D / 8][4], int lane, int ngroups, int lg_group) {
  switch (fmt) {
    case kF32: chunk_pv<D, kF32, T>(slot, pa, o, lane, ngroups, lg_group); break;
    case kF16: chunk_pv<D, kF16, T>(slot, pa, o, lane, ngroups, lg_group); break;
    case kBF16: chunk_pv<D, kBF16, T>(slot, pa, o, lane, ngroups, lg_group); break;
    case kI8: chunk_pv<D, kI8, T>(slot, pa, o, lane, ngroups, lg_group); break;
    case kI4: chunk_pv<D, kI4, T>(slot, pa, o, lane, ngroups, lg_group); break;
    default: chunk_pv<D, kI2, T>(slot, pa, o, lane, ngroups, lg_group); break;
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------
// Kernel 1: partial attention of one (b, KV head, row tile) over one split of blocks.

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const __grid_constant__ SplitArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int split = blockIdx.y;
  const int rt = blockIdx.x % a.row_tiles;
  const int bh = blockIdx.x / a.row_tiles;
  const int b = bh / a.p.kv_heads, h = bh % a.p.kv_heads;
  const int cpb = 1 << a.lg_cpb;
  const int j_lo = a.first_block + split * a.blocks_per_split;
  const int j_hi = min(j_lo + a.blocks_per_split, a.nbt);
  const int n_sealed = max(0, min(j_hi, a.p.num_blocks) - j_lo);
  const int n_chunks = n_sealed * cpb + (j_hi > a.p.num_blocks ? a.tail_chunks : 0);

  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  uint4* qs = reinterpret_cast<uint4*>(smem + a.table_bytes);
  uint8_t* ring = smem + a.table_bytes + a.q_bytes + warp * a.stages * a.slot_bytes;
  const uint32_t ring_s = smem_u32(ring);

  // The split's block table, (page << 3 | tier), or kPoison where the entry cannot be read.
  for (int i = threadIdx.x; i < n_sealed; i += kThreads) {
    const int64_t idx = static_cast<int64_t>(bh) * a.p.num_blocks + j_lo + i;
    const int tier = a.p.tiers[idx];
    const int32_t page = a.p.pages[idx];
    const bool ok = tier >= 0 && tier < 6 && a.p.pools[tier].k != nullptr && page >= 0 && page < a.p.pools[tier].pages;
    table[i] = ok ? (static_cast<uint32_t>(page) << 3) | static_cast<uint32_t>(tier) : kPoison;
  }

  // Rows g and g+8 of the tile: Q into the thread-private order qs[(v*2 + half)*32 + lane] (8 channels each),
  // and the key range each row may see: lo <= t <= hi (invalid rows: none).
  int lo[2], hi[2];
  const uint8_t* mrow[2];
  const int n_pos = a.seq_len;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = rt * 16 + g + 8 * half;
    const bool valid = row < a.gq;
    const int gh = valid ? row / a.p.num_queries : 0, qi = valid ? row % a.p.num_queries : 0;
    const uint4* src = reinterpret_cast<const uint4*>(
        static_cast<const T*>(a.p.q) + b * a.p.q_stride_b + static_cast<int64_t>(h * a.group + gh) * a.p.q_stride_h +
        qi * a.p.q_stride_q + c * (D / 4));
#pragma unroll
    for (int v = 0; v < D / 32; ++v) qs[(v * 2 + half) * 32 + lane] = valid ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
    const int pos = n_pos - a.p.num_queries + qi;
    hi[half] = valid ? pos : -1;
    lo[half] = a.p.sliding_window > 0 ? pos - a.p.sliding_window + 1 : 0;
    mrow[half] = a.p.mask != nullptr ? a.p.mask + b * a.p.mask_stride_b + qi * a.p.mask_stride_q : nullptr;
  }
  __syncthreads();

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[D / 8][4];
#pragma unroll
  for (int t = 0; t < D / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
  uint32_t pa[4] = {0, 0, 0, 0};

  // Warp-private pipeline over half-chunks: step 2i stages/computes K of the warp's chunk i, step 2i+1 its V.
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + kWarps - 1) / kWarps : 0;
  const int n_steps = 2 * my_chunks;
  const int stages = a.stages;
  for (int st = 0; st < stages - 1; ++st) {
    if (st < n_steps) {
      const Chunk ch = describe(a, table, warp + kWarps * (st >> 1), n_sealed, j_lo);
      issue<D>(a, ring_s + st * a.slot_bytes, ch, st & 1, b, h, lane);
    }
    cp_async_commit();
  }
  int slot_idx = 0;
  for (int st = 0; st < n_steps; ++st) {
    cp_async_wait_dyn(stages - 2);  // this step's group has landed (for this thread) ...
    __syncwarp();                   // ... for every lane, and every lane is done with the slot refilled next
    {
      const int ahead = st + stages - 1;
      if (ahead < n_steps) {
        const Chunk nx = describe(a, table, warp + kWarps * (ahead >> 1), n_sealed, j_lo);
        const int ahead_slot = slot_idx == 0 ? stages - 1 : slot_idx - 1;
        issue<D>(a, ring_s + ahead_slot * a.slot_bytes, nx, ahead & 1, b, h, lane);
      }
      cp_async_commit();
    }
    const Chunk ch = describe(a, table, warp + kWarps * (st >> 1), n_sealed, j_lo);
    const uint8_t* slot = ring + slot_idx * a.slot_bytes;
    slot_idx = slot_idx + 1 == stages ? 0 : slot_idx + 1;
    const bool rows_live = a.blk_m != nullptr && c == 0;
    if ((st & 1) == 0) {
      if (ch.fmt == static_cast<int>(kPoison)) {
        l[0] = l[1] = __int_as_float(0x7fffffff);  // NaN: out and lse of these rows become NaN
        continue;
      }
      float s[2][4] = {};
      scores_dispatch<D, T>(ch.fmt, slot, qs, s, lane);
      // scale, softcap, masks
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e >> 1;
          const int t = ch.t0 + n * 8 + 2 * c + (e & 1);
          float x = s[n][e] * a.p.scale;
          if (a.p.softcap > 0.0f) x = a.p.softcap * tanhf(x / a.p.softcap);
          bool ok = t >= lo[half] && t <= hi[half];
          if (ok && mrow[half] != nullptr) ok = mrow[half][t] != 0;
          s[n][e] = ok ? x : -INFINITY;
        }
      }
      float rowsum[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float mx = quad_max(
            fmaxf(fmaxf(s[0][2 * half], s[0][2 * half + 1]), fmaxf(s[1][2 * half], s[1][2 * half + 1])));
        const float m_new = fmaxf(m[half], mx);
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // nothing allowed yet: shift by 0
        const float alpha = exp2f((m[half] - m_safe) * kLog2e);
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            s[n][e] = exp2f((s[n][e] - m_safe) * kLog2e);
            sum += s[n][e];
          }
        }
        l[half] = l[half] * alpha + sum;
        m[half] = m_new;
#pragma unroll
        for (int t = 0; t < D / 8; ++t) {
          o[t][2 * half] *= alpha;
          o[t][2 * half + 1] *= alpha;
        }
        if (a.blk_m != nullptr) {
          rowsum[half] = quad_sum(sum);
          const int row = rt * 16 + g + 8 * half;
          if (rows_live && row < a.gq) {
            const int64_t idx = (static_cast<int64_t>(bh) * a.gq + row) * a.nch + ch.gid;
            a.blk_m[idx] = m_safe;
            a.blk_s[idx] = rowsum[half];
          }
        }
      }
      pa[0] = MmaType<T>::pack(s[0][0], s[0][1]);
      pa[1] = MmaType<T>::pack(s[0][2], s[0][3]);
      pa[2] = MmaType<T>::pack(s[1][0], s[1][1]);
      pa[3] = MmaType<T>::pack(s[1][2], s[1][3]);
    } else {
      if (ch.fmt == static_cast<int>(kPoison)) continue;
      pv_dispatch<D, T>(ch.fmt, slot, pa, o, lane, a.ngroups, a.lg_group);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int half = 0; half < 2; ++half) l[half] = quad_sum(l[half]);

  // Merge the four warps: warps 1..3 leave (m, l) and their accumulators (lane-major: conflict-free) in shared
  // memory, warp 0 combines them with its own and writes the CTA's partial.
  __syncthreads();  // every warp is done with its ring: the space is reused
  float* s_ml = reinterpret_cast<float*>(smem);  // [kWarps][2 (m, l)][16 rows]
  float4* s_o = reinterpret_cast<float4*>(smem + kWarps * 2 * 16 * sizeof(float));  // [kWarps-1][D/8][32]
  if (warp > 0) {
    if (c == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        s_ml[(warp * 2) * 16 + g + 8 * half] = m[half];
        s_ml[(warp * 2 + 1) * 16 + g + 8 * half] = l[half];
      }
    }
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      s_o[((warp - 1) * (D / 8) + t) * 32 + lane] = make_float4(o[t][0], o[t][1], o[t][2], o[t][3]);
    }
  }
  __syncthreads();
  if (warp != 0) return;
  float wt[kWarps][2], m_tot[2], l_tot[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = g + 8 * half;
    float mx = m[half];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, s_ml[(w * 2) * 16 + row]);
    const float m_safe = mx == -INFINITY ? 0.0f : mx;
    wt[0][half] = exp2f((m[half] - m_safe) * kLog2e);
    float lt = l[half] * wt[0][half];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      wt[w][half] = exp2f((s_ml[(w * 2) * 16 + row] - m_safe) * kLog2e);
      lt += s_ml[(w * 2 + 1) * 16 + row] * wt[w][half];
    }
    m_tot[half] = mx;
    l_tot[half] = lt;
  }
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
    o[t][0] *= wt[0][0], o[t][1] *= wt[0][0], o[t][2] *= wt[0][1], o[t][3] *= wt[0][1];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 x = s_o[((w - 1) * (D / 8) + t) * 32 + lane];
      o[t][0] += x.x * wt[w][0], o[t][1] += x.y * wt[w][0], o[t][2] += x.z * wt[w][1], o[t][3] += x.w * wt[w][1];
    }
  }
  // Row g+8h holds channels (2c+e)*D/8 + t (e = 0, 1; t < D/8): two runs of D/8, written 16 bytes at a time.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = rt * 16 + g + 8 * half;
    if (row >= a.gq) continue;
    const int64_t part = (static_cast<int64_t>(bh) * a.num_splits + split) * a.gq + row;
    if (c == 0) {
      a.m_part[part] = m_tot[half];
      a.l_part[part] = l_tot[half];
    }
    float* acc = a.acc_part + part * D;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int t4 = 0; t4 < D / 32; ++t4) {
        const int k = 2 * half + e;
        *reinterpret_cast<float4*>(acc + (2 * c + e) * (D / 8) + 4 * t4) =
            make_float4(o[4 * t4][k], o[4 * t4 + 1][k], o[4 * t4 + 2][k], o[4 * t4 + 3][k]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel 2: LSE combination of the splits, one warp per (b, KV head, row); lane owns channels [lane*V, +V).

template <typename T>
__device__ __forceinline__ void store_out(T* dst, const float* x, int n);

template <>
__device__ __forceinline__ void store_out<__half>(__half* dst, const float* x, int n) {
  for (int i = 0; i < n; i += 2) *reinterpret_cast<__half2*>(dst + i) = __floats2half2_rn(x[i], x[i + 1]);
}
template <>
__device__ __forceinline__ void store_out<__nv_bfloat16>(__nv_bfloat16* dst, const float* x, int n) {
  for (int i = 0; i < n; i += 2) *reinterpret_cast<__nv_bfloat162*>(dst + i) = __floats2bfloat162_rn(x[i], x[i + 1]);
}

template <int D, typename T>
__global__ void __launch_bounds__(128) decode_reduce_kernel(const __grid_constant__ ReduceArgs a) {
  constexpr int V = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (row_id >= a.rows) return;  // whole warps
  const int64_t bh = row_id / a.gq;
  const int r = static_cast<int>(row_id % a.gq);
  const int b = static_cast<int>(bh / a.kv_heads), h = static_cast<int>(bh % a.kv_heads);
  const int hq = h * a.group + r / a.num_queries, qi = r % a.num_queries;
  const int64_t out_row = (static_cast<int64_t>(b) * a.q_heads + hq) * a.num_queries + qi;
  const int64_t first = bh * a.num_splits * a.gq + r;  // split s at first + s*gq
  const int S = a.num_splits;

  float mx = -INFINITY;
  for (int s = lane; s < S; s += 32) mx = fmaxf(mx, a.m_part[first + static_cast<int64_t>(s) * a.gq]);
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, k));
  const float m_safe = mx == -INFINITY ? 0.0f : mx;
  float lt = 0.0f;
  for (int s = lane; s < S; s += 32) {
    const int64_t i = first + static_cast<int64_t>(s) * a.gq;
    lt += a.l_part[i] * exp2f((a.m_part[i] - m_safe) * kLog2e);  // a split that saw nothing: weight 0
  }
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) lt += __shfl_xor_sync(0xffffffffu, lt, k);

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int s = 0; s < S; ++s) {
    const int64_t i = first + static_cast<int64_t>(s) * a.gq;
    const float w = exp2f((a.m_part[i] - m_safe) * kLog2e);
    if (w == 0.0f) continue;  // uniform across the warp
    const float* src = a.acc_part + i * D + lane * V;
#pragma unroll
    for (int k = 0; k < V; k += 2) {
      const float2 x = *reinterpret_cast<const float2*>(src + k);
      acc[k] = fmaf(x.x, w, acc[k]);
      acc[k + 1] = fmaf(x.y, w, acc[k + 1]);
    }
  }
  // l == 0: nothing allowed. A NaN l (poisoned table entry) is not 0 and propagates.
  const bool empty = lt == 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = empty ? 0.0f : acc[i] / lt;
  store_out<T>(static_cast<T*>(a.out) + out_row * D + lane * V, acc, V);
  const float lse = empty ? -INFINITY : m_safe + logf(lt);
  if (lane == 0) a.lse[out_row] = lse;
  if (a.mass == nullptr) return;
  const int64_t terms = (bh * a.gq + r) * a.nch;
  for (int j = lane; j < a.nbt; j += 32) {
    float v = 0.0f;
    if (!empty && j >= a.first_block) {
      const int n = j < a.num_blocks ? a.cpb : a.tail_chunks;
      for (int k = 0; k < n; ++k) {
        const int64_t i = terms + static_cast<int64_t>(j) * a.cpb + k;
        v += a.blk_s[i] * exp2f((a.blk_m[i] - lse) * kLog2e);
      }
    }
    a.mass[out_row * a.nbt + j] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }
int log2_exact(int64_t x) {  // x a power of two
  int k = 0;
  while ((int64_t{1} << k) < x) ++k;
  return k;
}
bool power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

int tier_bits(int tier) { return tier == kF32 ? 32 : tier <= kBF16 ? 16 : tier == kI8 ? 8 : tier == kI4 ? 4 : 2; }

// Shared memory of one staged half-chunk of a tier: K data + per-channel scale/zero, V data + per-token ones.
int half_chunk_bytes(int tier, int d, int group_size) {
  const int data = kChunk * d * tier_bits(tier) / 8;
  if (tier <= kBF16) return data;
  return data + std::max(2 * 2 * d, 2 * kChunk * (d / group_size) * 2);
}

int device_attribute(cudaDeviceAttr attr, int device, std::atomic<int>* cache) {
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess || v <= 0) return 0;
  if (device >= 0 && device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

std::atomic<int> g_sm_count[kMaxDevices];
std::atomic<int> g_smem_optin[kMaxDevices];

template <int D, typename T>
cudaError_t launch(const DecodeAttentionParams& p, const DecodeAttentionPlan& plan, float* ws, cudaStream_t stream) {
  const int hq = p.q_heads, hkv = p.kv_heads;
  const int gq = hq / hkv * p.num_queries;
  const int nb = p.num_blocks, tl = p.tail_len;
  const int cpb = p.block_size / kChunk;
  const int tail_chunks = cdiv(tl, kChunk);
  const int nch = nb * cpb + tail_chunks;
  const int64_t bhkv = static_cast<int64_t>(p.batch) * hkv;
  const int64_t parts = round4(bhkv * plan.num_splits * gq);

  SplitArgs a{};
  a.p = p;
  a.m_part = ws;
  a.l_part = ws + parts;
  a.acc_part = ws + 2 * parts;
  float* blk = ws + 2 * parts + bhkv * plan.num_splits * gq * D;
  const int64_t terms = round4(bhkv * gq * nch);
  a.blk_m = p.block_mass != nullptr ? blk : nullptr;
  a.blk_s = p.block_mass != nullptr ? blk + terms : nullptr;
  a.gq = gq;
  a.group = hq / hkv;
  a.row_tiles = plan.row_tiles;
  a.num_splits = plan.num_splits;
  a.blocks_per_split = plan.blocks_per_split;
  a.first_block = plan.first_block;
  a.nbt = nb + (tl > 0 ? 1 : 0);
  a.nch = nch;
  a.lg_cpb = log2_exact(cpb);
  a.tail_chunks = tail_chunks;
  a.seq_len = nb * p.block_size + tl;
  a.stages = plan.stages;
  a.slot_bytes = plan.slot_bytes;
  a.table_bytes = static_cast<int>((int64_t{4} * plan.blocks_per_split + 15) / 16 * 16);
  a.q_bytes = 32 * D;
  a.lg_group = log2_exact(p.group_size);
  a.ngroups = D / p.group_size;

  auto split_kernel = decode_split_kernel<D, T>;
  if (plan.smem_bytes > 48 * 1024) {
    // Opt in to more than 48 KB once per (kernel, device) and size.
    static std::atomic<int> configured[kMaxDevices];
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const bool cached = device < kMaxDevices && configured[device].load(std::memory_order_relaxed) >= plan.smem_bytes;
    if (!cached) {
      err = cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes);
      if (err != cudaSuccess) return err;
      if (device < kMaxDevices) configured[device].store(plan.smem_bytes, std::memory_order_relaxed);
    }
  }
  const dim3 grid(static_cast<unsigned>(bhkv * plan.row_tiles), static_cast<unsigned>(plan.num_splits));
  split_kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  ReduceArgs r{};
  r.m_part = a.m_part;
  r.l_part = a.l_part;
  r.acc_part = a.acc_part;
  r.blk_m = a.blk_m;
  r.blk_s = a.blk_s;
  r.out = p.out;
  r.lse = p.lse;
  r.mass = p.block_mass;
  r.rows = bhkv * gq;
  r.gq = gq;
  r.group = hq / hkv;
  r.num_queries = p.num_queries;
  r.kv_heads = hkv;
  r.q_heads = hq;
  r.num_splits = plan.num_splits;
  r.nbt = a.nbt;
  r.num_blocks = nb;
  r.first_block = plan.first_block;
  r.cpb = cpb;
  r.tail_chunks = tail_chunks;
  r.nch = nch;
  decode_reduce_kernel<D, T><<<static_cast<unsigned>((r.rows + 3) / 4), 128, 0, stream>>>(r);
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_dtype(const DecodeAttentionParams& p, const DecodeAttentionPlan& plan, float* ws, cudaStream_t s) {
  if (p.q_type == FloatType::Float16) return launch<D, __half>(p, plan, ws, s);
  return launch<D, __nv_bfloat16>(p, plan, ws, s);
}

}  // namespace

cudaError_t plan_decode_attention(const DecodeAttentionParams& p, int num_splits, int device,
                                  DecodeAttentionPlan* plan) {
  const int d = p.head_dim;
  if (d != 64 && d != 128 && d != 256) return cudaErrorInvalidValue;
  if (p.q_type != FloatType::Float16 && p.q_type != FloatType::BFloat16) return cudaErrorInvalidValue;
  if (!power_of_two(p.block_size) || p.block_size < kChunk) return cudaErrorInvalidValue;
  if (!power_of_two(p.group_size) || d % p.group_size != 0) return cudaErrorInvalidValue;
  if (p.batch < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0 || p.num_queries < 1) return cudaErrorInvalidValue;
  if (p.num_blocks < 0 || p.tail_len < 0 || p.tail_len >= p.block_size || p.sliding_window < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t n = static_cast<int64_t>(p.num_blocks) * p.block_size + p.tail_len;
  if (p.num_queries > n || n > INT32_MAX / 2) return cudaErrorInvalidValue;
  const int nbt = p.num_blocks + (p.tail_len > 0 ? 1 : 0);
  const int gq = p.q_heads / p.kv_heads * p.num_queries;

  DecodeAttentionPlan out;
  out.row_tiles = cdiv(gq, 16);
  // First block any query can see: the earliest query (position N - Q) sees keys > N - Q - W.
  const int64_t first_visible = n - p.num_queries - p.sliding_window + 1;
  out.first_block = p.sliding_window > 0 ? static_cast<int>(std::max<int64_t>(0, first_visible) / p.block_size) : 0;
  const int live = nbt - out.first_block;
  int splits = num_splits;
  if (splits <= 0) {
    const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device, g_sm_count);
    const int64_t programs = static_cast<int64_t>(p.batch) * p.kv_heads * out.row_tiles;
    splits = cdiv(int64_t{kCtasPerSm} * std::max(sms, 1), programs);
  }
  splits = std::clamp(splits, 1, live);
  splits = std::max(splits, cdiv(live, kMaxSplitBlocks));
  splits = std::min(splits, 65535);
  out.blocks_per_split = cdiv(live, splits);
  out.num_splits = cdiv(live, out.blocks_per_split);  // no split without a block
  if (out.blocks_per_split > kMaxSplitBlocks) return cudaErrorInvalidValue;  // > 65535 * 1024 blocks

  int slot = 0;
  for (int tier = 0; tier < 6; ++tier) {
    if (p.pools[tier].k != nullptr) slot = std::max(slot, half_chunk_bytes(tier, d, p.group_size));
  }
  if (p.tail_len > 0) slot = std::max(slot, half_chunk_bytes(static_cast<int>(p.tail_type), d, p.group_size));
  out.slot_bytes = (slot + 15) / 16 * 16;
  if (out.slot_bytes == 0) out.slot_bytes = 16;
  out.stages = std::clamp(stage_budget(d) / (kWarps * out.slot_bytes), 2, kMaxStages);
  const int table = (4 * out.blocks_per_split + 15) / 16 * 16;
  const int main = table + 32 * d + kWarps * out.stages * out.slot_bytes;
  const int merge = kWarps * 2 * 16 * 4 + (kWarps - 1) * (d / 8) * 32 * 16;
  out.smem_bytes = std::max(main, merge);
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, g_smem_optin);
  if (optin > 0 && out.smem_bytes > optin) return cudaErrorInvalidConfiguration;

  const int64_t bhkv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t parts = round4(bhkv * out.num_splits * gq);
  int64_t floats = 2 * parts + bhkv * out.num_splits * gq * d;
  if (p.block_mass != nullptr) {
    const int64_t nch = static_cast<int64_t>(p.num_blocks) * (p.block_size / kChunk) + cdiv(p.tail_len, kChunk);
    floats += 2 * round4(bhkv * gq * nch);
  }
  out.workspace_floats = round4(floats);
  *plan = out;
  return cudaSuccess;
}

cudaError_t decode_attention(const DecodeAttentionParams& p, const DecodeAttentionPlan& plan, float* workspace,
                             cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_dtype<64>(p, plan, workspace, stream);
    case 128: return launch_dtype<128>(p, plan, workspace, stream);
    case 256: return launch_dtype<256>(p, plan, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvprec::cuda
