// CUDA flash-decoding attention over a mixed-precision paged KV cache, torch-free: raw pointers, element
// strides, a stream, an error code. The design (grid, what each thread holds, how bytes flow) is at the top of
// decode_attention_kernels.cu; the semantics are those of kvprec/ops/reference/decode_attention.py:
//
//   for query head hq (KV head hq / (Hq/Hkv)) and query i at position p_i = N - Q + i, in FP32:
//     s_t = scale * q_i . k_t;  s_t = c tanh(s_t / c) (softcap c > 0);
//     s_t = -inf unless t <= p_i, t > p_i - W (sliding window W > 0) and mask[b, i, t];
//     out_i = sum_t softmax(s)_t v_t;  lse_i = log sum_t e^(s_t);  mass_i[j] = sum_{t in block j} softmax(s)_t
//   a query with nothing to attend gets out 0, lse -inf, mass 0.
//
// The cache (csrc/include/kvprec/buffer.h, kvprec/ops/reference/paged.py): sealed block j of (b, h) is page
// pages[b, h, j] of the pool of tier tiers[b, h, j]; positions 0..N-1 are the NB sealed blocks of T tokens, then
// the TL < T tail tokens in the model dtype. Formats per tier: csrc/include/kvprec/formats.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvprec::cuda {

// Float element types, numbered as the float tiers (kvprec::Tier FP32 = 0, FP16 = 1, BF16 = 2).
enum class FloatType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// head_dim values the kernels are compiled for, and the smallest block_size (they read 16-token chunks; a block
// size must be a power of two >= this).
inline constexpr int kDecodeHeadDims[] = {64, 128, 256};
inline constexpr int kDecodeMinBlockSize = 16;
// Largest pool (pages) a block-table entry can address: the kernels pack (page << 3 | tier) in 32 bits.
inline constexpr int64_t kDecodeMaxPoolPages = int64_t{1} << 28;

// One tier's paged pool (all contiguous, 16-byte aligned). k == nullptr: no pool of this tier.
//   float tiers:   k, v [P, T, D] in the tier's dtype; no metadata.
//   integer tiers: k, v uint8 [P, T, D*bits/8]; k_scale, k_zero FP16 bits [P, D]; v_scale, v_zero [P, T, D/G].
struct DecodePool {
  const void* k = nullptr;
  const void* v = nullptr;
  const uint16_t* k_scale = nullptr;
  const uint16_t* k_zero = nullptr;
  const uint16_t* v_scale = nullptr;
  const uint16_t* v_zero = nullptr;
  int64_t pages = 0;  // P: block-table entries with page >= P (or a tier without a pool) poison their row (NaN)
};

struct DecodeAttentionParams {
  // q [B, Hq, Q, D], float16 or bfloat16; element strides of dims 0..2, dim 3 contiguous; rows 16-byte aligned.
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_q = 0;
  FloatType q_type = FloatType::Float16;
  DecodePool pools[6];  // indexed by tier id
  // Block table [B, Hkv, NB], contiguous (unused when NB == 0).
  const int8_t* tiers = nullptr;
  const int32_t* pages = nullptr;
  // Tail [B, Hkv, TL, D] (K and V share strides; dim 3 contiguous; rows 16-byte aligned), any float type.
  const void* tail_k = nullptr;
  const void* tail_v = nullptr;
  int64_t tail_stride_b = 0, tail_stride_h = 0, tail_stride_t = 0;
  FloatType tail_type = FloatType::Float16;
  // Optional mask [B, Q, N] (nonzero = may attend), dim 2 contiguous; nullptr = none.
  const uint8_t* mask = nullptr;
  int64_t mask_stride_b = 0, mask_stride_q = 0;
  // Outputs: out [B, Hq, Q, D] contiguous in q's type; lse FP32 [B, Hq, Q]; block_mass FP32 [B, Hq, Q, NBT] or
  // nullptr (NBT = NB + (TL > 0)).
  void* out = nullptr;
  float* lse = nullptr;
  float* block_mass = nullptr;
  int batch = 0, q_heads = 0, kv_heads = 0, num_queries = 0, head_dim = 0;
  int block_size = 0, group_size = 0, num_blocks = 0, tail_len = 0;
  float scale = 1.0f, softcap = 0.0f;  // softcap 0 = none
  int sliding_window = 0;              // 0 = none
};

// Launch geometry and scratch sizes, chosen on the host by plan_decode_attention.
struct DecodeAttentionPlan {
  int num_splits = 1;        // S: grid.y of the split kernel
  int blocks_per_split = 1;  // blocks of the live range per split
  int first_block = 0;       // blocks before it lie wholly outside every query's sliding window: never read
  int row_tiles = 1;         // R = ceil(G*Q / 16) tiles of (query head, query) rows per KV head
  int stages = 2;            // cp.async pipeline depth per warp (half-chunks in flight + 1)
  int slot_bytes = 0;        // shared memory of one stage (the largest half-chunk of the tiers present)
  int smem_bytes = 0;        // dynamic shared memory of the split kernel
  int64_t workspace_floats = 0;  // FP32 scratch the caller provides (split partials, per-chunk mass terms)
};

// Chooses splits like the Triton launcher (about 4 CTAs per SM over the live block range; num_splits > 0
// overrides, clamped to [1, live blocks]) and sizes shared memory and scratch. `device` is the CUDA device the
// launch will run on (its SM count is queried once and cached). cudaErrorInvalidValue for unsupported inputs
// (the torch glue checks them first and names them).
cudaError_t plan_decode_attention(const DecodeAttentionParams& p, int num_splits, int device,
                                  DecodeAttentionPlan* plan);

// Two launches on `stream`: the split kernel and the LSE reduce. `workspace`: plan.workspace_floats FP32,
// 16-byte aligned, contents ignored.
cudaError_t decode_attention(const DecodeAttentionParams& p, const DecodeAttentionPlan& plan, float* workspace,
                             cudaStream_t stream);

}  // namespace kvprec::cuda
