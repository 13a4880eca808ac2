// MixedPrecisionBuffer: the KV cache of one layer at mixed precision. One implementation, used by the C++
// demos and (as torch.classes.kvprec.MixedPrecisionBuffer) by Python.
//
// Data layout (docs/design.md, "Data layout of the cache"):
//   * positions are grouped in blocks of block_size (T) tokens; the newest, incomplete block stays in the
//     model dtype in the tail [B, H, T, D]; a block is sealed when it fills;
//   * a sealed block has one tier per (batch row, KV head); its K/V and metadata live in a page of that
//     tier's pool (one set of tensors per tier, see PoolView); the block table maps
//     (b, h, block) -> (tier, page);
//   * demotion re-quantizes from the highest copy still held: the host shadow when kept, else the page;
//     promotion is only possible from the shadow (BufferOptions::shadow), never pretended;
//   * pages are never shared between batch rows: index_batch() copies, so re-tiering one row never
//     changes another;
//   * a sliding-window layer may evict the oldest sealed blocks (evict_blocks): their pages and shadow copies
//     are released and their table entries read tier kEvictedTier and page -1. Evicted blocks are always a
//     prefix [0, evicted_blocks()); positions keep their numbering.
// All sequences of a batch have the same length (padding is the attention mask's job, as in HF).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <memory>
#include <utility>
#include <vector>

#include "kvprec/formats.h"

namespace kvprec {

// Tier id of an evicted block's table entries (tiers() and pages() read -1 there).
constexpr int8_t kEvictedTier = -1;

struct BufferOptions {
  int64_t batch = 1;
  int64_t kv_heads = 1;
  int64_t head_dim = 128;
  int64_t block_size = 64;
  int64_t group_size = 0;                  // value quantization group along head_dim; 0: default_group_size(head_dim)
  at::ScalarType dtype = at::kHalf;        // model dtype: the tail, gather() and attention output
  c10::Device device = c10::Device(c10::kCPU);
  Tier default_tier = Tier::INT4;          // tier of sealed blocks when append() gets no tiers
  bool shadow = false;                     // keep a host copy of each sealed block in the model dtype
};

// One tier's paged pool; tensors have capacity pages along dim 0 (capacity >= pages in use).
//   float tiers:   k, v [P, T, D] in the tier dtype; k_scale, k_zero, v_scale, v_zero undefined
//   integer tiers: k, v uint8 [P, T, D*bits/8]; k_scale, k_zero FP16 [P, D]; v_scale, v_zero FP16 [P, T, D/G]
struct PoolView {
  at::Tensor k, k_scale, k_zero, v, v_scale, v_zero;
};

struct MemoryReport {
  std::array<int64_t, kNumTiers> tier_bytes{};  // live pages: K + V data + scales + zeros
  std::array<int64_t, kNumTiers> tier_pages{};  // live pages per tier
  int64_t tail_bytes = 0;                       // the tail buffer as allocated (B*H*T*D*2 elements)
  int64_t table_bytes = 0;                      // block table: tier (1 byte) + page (4 bytes) per entry
                                                // (B * H * num_sealed_blocks entries, evicted ones included)
  int64_t shadow_bytes = 0;                     // host shadow copies (not device memory; reported apart):
                                                // 2 * B * H * T * D * sizeof(model dtype) per sealed block
                                                // that is not evicted
  int64_t reserved_bytes = 0;                   // all pool capacity, live or free (what the allocator holds)
  int64_t tokens = 0;                           // sequence length
  int64_t elements = 0;                         // B * H * held tokens * D * 2 (K and V; held = tokens minus
                                                // the evicted blocks' positions)

  int64_t resident_bytes() const;               // sum(tier_bytes) + tail_bytes + table_bytes
  double bits_per_element() const;              // resident_bytes * 8 / elements (0 when elements == 0)
  double compression_vs_fp16() const;           // (elements * 2) / resident_bytes
};

class MixedPrecisionBuffer {
 public:
  explicit MixedPrecisionBuffer(const BufferOptions& options);
  // Not copyable: a copy would share the pools but not seq_len_; move it, or copy rows with index_batch().
  MixedPrecisionBuffer(const MixedPrecisionBuffer&) = delete;
  MixedPrecisionBuffer& operator=(const MixedPrecisionBuffer&) = delete;
  MixedPrecisionBuffer(MixedPrecisionBuffer&&) = default;
  MixedPrecisionBuffer& operator=(MixedPrecisionBuffer&&) = default;

  const BufferOptions& options() const { return opts_; }
  BlockGeometry geometry() const { return {opts_.block_size, opts_.head_dim, opts_.group_size}; }

  // Append new tokens k, v [B, H, n, D] (any float dtype; stored in the model dtype). Every block that
  // fills is sealed; `seal_tiers` (int8 [B, H, blocks_sealed_by(n)], tier ids) gives their tiers, or
  // default_tier when undefined.
  void append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& seal_tiers = at::Tensor());
  int64_t blocks_sealed_by(int64_t new_tokens) const;

  int64_t seq_len() const { return seq_len_; }
  int64_t num_sealed_blocks() const { return num_blocks_; }
  int64_t tail_len() const { return seq_len_ - num_blocks_ * opts_.block_size; }
  // Sealed blocks [0, evicted_blocks()) are evicted (evict_blocks).
  int64_t evicted_blocks() const { return evicted_; }

  // The block table is host metadata: tiers() and pages() are CPU tensors (copies).
  at::Tensor tiers() const;   // int8 [B, H, num_sealed_blocks]; kEvictedTier (-1) for evicted blocks
  at::Tensor pages() const;   // int32 [B, H, num_sealed_blocks]; -1 for evicted blocks
  PoolView pool(Tier tier) const;  // the live pool tensors (no copy); undefined before the tier's first page
  at::Tensor tail_keys() const;    // [B, H, tail_len, D], model dtype (a view)
  at::Tensor tail_values() const;

  // Sealed block `index` back in `dtype` (undefined: the model dtype), [B, H, T, D] each. An evicted block throws.
  std::pair<at::Tensor, at::Tensor> block(int64_t index, at::ScalarType dtype = at::ScalarType::Undefined) const;
  // Positions [start, end) back in the model dtype, [B, H, end - start, D] each. Dequantizes one block at a time;
  // a range that reaches an evicted block throws.
  std::pair<at::Tensor, at::Tensor> gather(int64_t start, int64_t end) const;
  // The host shadow of sealed block `index` (copies): K, V [B, H, T, D] in the model dtype on the CPU, the values
  // the block was sealed from. For exporting the buffer's state (Python pickling). Throws without a shadow
  // (BufferOptions::shadow) or for an evicted block.
  std::pair<at::Tensor, at::Tensor> shadow_block(int64_t index) const;

  // Re-tier sealed block `index`: tiers int8 [B, H], -1 = leave as is. Lower tiers re-quantize from the
  // highest copy held; a higher tier needs the shadow, else it throws (lost bits are not restored). An evicted
  // block throws unless every entry is -1.
  void set_block_tiers(int64_t index, const at::Tensor& tiers);
  bool has_shadow() const { return opts_.shadow; }

  // Keep the first new_len positions. Sealed blocks past new_len return to the tail: from the shadow when
  // kept, else dequantized (lossy for integer tiers). new_len >= seq_len() leaves the buffer as is. A crop that
  // would make an evicted block the tail again throws (its positions are gone).
  void crop(int64_t new_len);
  // Evict sealed blocks [0, count): release their pages and shadow copies (for sliding-window layers, whose later
  // queries cannot see them). count <= evicted_blocks() does nothing; count > num_sealed_blocks() throws. Attention
  // over the buffer then needs a sliding window that keeps every query away from the evicted positions.
  void evict_blocks(int64_t count);
  // Keep batch rows idx (int64 [B']), in that order, repeats allowed (beam reorder, select, repeat_interleave).
  void index_batch(const at::Tensor& idx);
  // Empty the buffer (same batch); pool capacity stays reserved for reuse (reserved_bytes).
  void reset();

  MemoryReport memory() const;

 private:
  BufferOptions opts_;
  int64_t seq_len_ = 0;
  int64_t num_blocks_ = 0;
  int64_t evicted_ = 0;
  // Implementation state (pools, free lists, block table, tail, shadow) is the implementer's choice.
  struct State;
  std::shared_ptr<State> state_;

  // Seal `count` blocks as blocks num_sealed_blocks() onwards; tiers[r * count + s] is the tier of row r
  // (= b * H + h) of block s. The first comes from the full tail when `from_tail`, the others straight from
  // kb, vb [B, H, count - from_tail, T, D] (views of the appended k, v). Each tier present is quantized with one
  // quantize_append per source into freshly taken pages (in place); one synchronisation then checks the FP16
  // range of the tiers that need it, and a refusal gives the pages back before anything is committed.
  void seal_blocks(const std::vector<int8_t>& tiers, int64_t count, bool from_tail, const at::Tensor& kb,
                   const at::Tensor& vb);
  // Block j's pages of rows (b * H + h, all held at `tier`) dequantized to dtype: K, V [rows, T, D].
  std::pair<at::Tensor, at::Tensor> dequantize_rows(int64_t j, Tier tier, const std::vector<int64_t>& rows,
                                                    at::ScalarType dtype) const;
};

// Attention of queries over the buffer, reading each sealed block in its own tier and dequantizing one
// block at a time (online softmax, flash-decoding style); the CPU kernel and the reference for the fused
// GPU kernels. GQA without repeating K/V: query head h reads KV head h / (Hq / Hkv).
struct AttentionOptions {
  double scale = 0.0;           // 0: 1/sqrt(D)
  int64_t sliding_window = 0;   // > 0: query at position p sees keys in (p - window, p]
  double softcap = 0.0;         // > 0: scores -> softcap * tanh(scores / softcap) (Gemma 2)
  bool block_mass = false;      // also return attention mass per block
};

// A query row that may attend to no position (all masked) gets out = 0, lse = -inf and block_mass = 0.
struct AttentionResult {
  at::Tensor out;         // [B, Hq, Q, D], model dtype
  at::Tensor lse;         // [B, Hq, Q] FP32 log-sum-exp of the (scaled, capped, masked) scores
  at::Tensor block_mass;  // [B, Hq, Q, ceil(seq_len / T)] FP32 (the tail is the last block), if asked
};

// q [B, Hq, Q, D]: the Q newest positions of the buffer, bottom-right aligned: query i is at position
// seq_len - Q + i and attends causally. mask: optional bool [B, Q, seq_len] (true = may attend), e.g. padding.
// q must be in the model dtype with 1 <= Q <= seq_len; Hq a multiple of Hkv. Scores are computed in FP32 from
// each block dequantized to FP32 (not via the model dtype), then s -> softcap, then masks.
// When the buffer has evicted blocks, every query's window must lie past them (sliding_window > 0 and
// evicted_blocks() * T <= seq_len - Q - sliding_window + 1), else it throws rather than attend to lost positions.
AttentionResult attend(const MixedPrecisionBuffer& buffer, const at::Tensor& q, const at::Tensor& mask,
                       const AttentionOptions& options);

}  // namespace kvprec
