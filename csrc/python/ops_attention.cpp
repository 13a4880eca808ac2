// Registration of the attention ops over the paged mixed-precision cache. Fake kernels live in kvprec/ops/native.py;
// the pure-torch reference (the CPU default and the oracle) is kvprec/ops/reference/decode_attention.py.
//
// kvprec::decode_attention: flash-decoding attention of q [B, Hq, Q, D] (the Q newest positions, bottom-right
// causal) over the paged pools (the 24 slots of kvprec.ops.native.DECODE_POOL_SLOTS), the block table tiers int8 /
// pages int32 [B, Hkv, NB] and the tail [B, Hkv, TL, D]; optional bool mask [B, Q, N], sliding window, logit
// softcap (0 = none), num_splits (0 = automatic). Returns out [B, Hq, Q, D] (q's dtype), lse FP32 [B, Hq, Q] and,
// when block_mass, FP32 [B, Hq, Q, NB + (TL > 0)] (else an empty tensor). Only a CUDA kernel is registered
// (csrc/cuda/decode_attention_*); on CPU, kvprec.ops.decode_attention runs the reference.
#include <torch/library.h>

#ifdef KVPREC_WITH_CUDA
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace kvprec {
// csrc/cuda/decode_attention_cuda.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q, const c10::List<std::optional<at::Tensor>>& pools, const at::Tensor& tiers,
    const at::Tensor& pages, const at::Tensor& tail_k, const at::Tensor& tail_v, int64_t block_size,
    int64_t group_size, double scale, const std::optional<at::Tensor>& mask, int64_t sliding_window,
    double softcap, bool block_mass, int64_t num_splits);
}  // namespace kvprec
#endif

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  m.def("decode_attention(Tensor q, Tensor?[] pools, Tensor tiers, Tensor pages, Tensor tail_k, Tensor tail_v, "
        "int block_size, int group_size, float scale, Tensor? mask, int sliding_window, float softcap, "
        "bool block_mass, int num_splits=0) -> (Tensor out, Tensor lse, Tensor mass)");
}

#ifdef KVPREC_WITH_CUDA
TORCH_LIBRARY_IMPL(kvprec, CUDA, m) { m.impl("decode_attention", &kvprec::decode_attention_cuda); }
#endif
