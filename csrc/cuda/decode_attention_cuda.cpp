// ATen side of the CUDA decode attention (kvprec::decode_attention, schema in csrc/python/ops_attention.cpp):
// input checks with messages that name the argument, the outputs and the FP32 scratch, the current stream, and
// the torch-free launcher in decode_attention_kernels.cu. Compiled only when KVPREC_WITH_CUDA.
//
// `pools` is the flat list kvprec/ops/native.py DECODE_POOL_SLOTS describes (24 slots, None where a tier has no pool):
// the float tiers' (k, v), then the integer tiers' (k, k_scale, k_zero, v, v_scale, v_zero), in tier order.
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "decode_attention_kernels.cuh"
#include "kvprec/formats.h"

namespace kvprec {
namespace {

constexpr const char* kOp = "decode_attention (cuda)";

// Slot of each part of a tier's pool in `pools` (-1: the tier has no such part). Mirrors DECODE_POOL_SLOTS.
struct PoolSlots {
  int k, k_scale, k_zero, v, v_scale, v_zero;
};
constexpr PoolSlots kSlots[kNumTiers] = {
    {0, -1, -1, 1, -1, -1},   // fp32
    {2, -1, -1, 3, -1, -1},   // fp16
    {4, -1, -1, 5, -1, -1},   // bf16
    {6, 7, 8, 9, 10, 11},     // int8
    {12, 13, 14, 15, 16, 17}, // int4
    {18, 19, 20, 21, 22, 23}, // int2
};
constexpr int kNumSlots = 24;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cuda::FloatType float_type(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return cuda::FloatType::Float32;
    case at::kHalf: return cuda::FloatType::Float16;
    case at::kBFloat16: return cuda::FloatType::BFloat16;
    default: TORCH_CHECK(false, kOp, ": ", what, " dtype ", t, " is not accepted; use float32, float16 or bfloat16");
  }
}

at::ScalarType tier_dtype(Tier tier) {
  switch (tier) {
    case Tier::FP32: return at::kFloat;
    case Tier::FP16: return at::kHalf;
    case Tier::BF16: return at::kBFloat16;
    default: return at::kByte;
  }
}

std::optional<at::Tensor> slot(const c10::List<std::optional<at::Tensor>>& pools, int index) {
  if (index < 0) return std::nullopt;
  std::optional<at::Tensor> t = pools.get(index);
  if (t.has_value() && !t->defined()) return std::nullopt;
  return t;
}

// One part of a pool: on `device`, `dtype`, the given shape, contiguous, 16-byte aligned.
const void* checked_part(const std::optional<at::Tensor>& t, Tier tier, const char* name, at::ScalarType dtype,
                         at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK(t.has_value(), kOp, ": the ", tier_name(tier), " pool has k but no ", name);
  TORCH_CHECK(t->device() == device, kOp, ": pool ", tier_name(tier), " ", name, " is on ", t->device(),
              " but q is on ", device);
  TORCH_CHECK(t->scalar_type() == dtype && t->sizes() == shape, kOp, ": pool ", tier_name(tier), " ", name,
              " must be ", dtype, " ", shape, ", got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), kOp, ": pool ", tier_name(tier), " ", name,
              " must be contiguous (a copy of a whole pool per call would be hidden here; make it contiguous once)");
  TORCH_CHECK(aligned16(t->data_ptr()), kOp, ": pool ", tier_name(tier), " ", name,
              " must start at a 16-byte aligned address (the kernel copies 16-byte units)");
  return t->data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q_in, const c10::List<std::optional<at::Tensor>>& pools, const at::Tensor& tiers_in,
    const at::Tensor& pages_in, const at::Tensor& tail_k_in, const at::Tensor& tail_v_in, int64_t block_size,
    int64_t group_size, double scale, const std::optional<at::Tensor>& mask_in, int64_t sliding_window,
    double softcap, bool block_mass, int64_t num_splits) {
  // --- q
  TORCH_CHECK(q_in.is_cuda(), kOp, ": q must be a CUDA tensor, got one on ", q_in.device());
  TORCH_CHECK(q_in.dim() == 4, kOp, ": q must be [B, Hq, Q, D], got shape ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16, kOp, ": q dtype ",
              q_in.scalar_type(), " is not accepted; the CUDA kernel takes float16 or bfloat16 (float32 q: "
              "backend='triton' or 'torch')");
  const at::Device device = q_in.device();
  const int64_t b = q_in.size(0), hq = q_in.size(1), nq = q_in.size(2), d = q_in.size(3);
  bool head_dim_ok = false;
  for (int accepted : cuda::kDecodeHeadDims) head_dim_ok |= d == accepted;
  TORCH_CHECK(head_dim_ok, kOp, ": head_dim ", d, " is not supported; accepted head_dim 64, 128, 256");
  TORCH_CHECK(block_size >= cuda::kDecodeMinBlockSize && (block_size & (block_size - 1)) == 0, kOp,
              ": block_size ", block_size, " is not supported; accepted powers of two >= ", cuda::kDecodeMinBlockSize,
              " (the kernel reads 16-token chunks)");
  TORCH_CHECK(group_size > 0 && d % group_size == 0, kOp, ": group_size ", group_size, " must divide head_dim ", d);
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);
  TORCH_CHECK(sliding_window >= 0, kOp, ": sliding_window must be >= 0 (0 = none), got ", sliding_window);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), kOp, ": softcap must be finite and >= 0 (0 = none), got ",
              softcap);
  TORCH_CHECK(num_splits >= 0 && num_splits <= 65535, kOp, ": num_splits must be in [0, 65535] (0 = automatic), got ",
              num_splits);

  // --- tail: [B, Hkv, TL, D], K and V alike
  TORCH_CHECK(tail_k_in.dim() == 4 && tail_v_in.sizes() == tail_k_in.sizes(), kOp,
              ": tail_k and tail_v must both be [B, Hkv, TL, D], got ", tail_k_in.sizes(), " and ", tail_v_in.sizes());
  TORCH_CHECK(tail_k_in.device() == device && tail_v_in.device() == device, kOp, ": tail_k / tail_v are on ",
              tail_k_in.device(), " / ", tail_v_in.device(), " but q is on ", device);
  TORCH_CHECK(tail_v_in.scalar_type() == tail_k_in.scalar_type(), kOp, ": tail_k is ", tail_k_in.scalar_type(),
              " but tail_v is ", tail_v_in.scalar_type());
  const cuda::FloatType tail_type = float_type(tail_k_in.scalar_type(), "tail_k");
  const int64_t hkv = tail_k_in.size(1), tl = tail_k_in.size(2);
  TORCH_CHECK(tail_k_in.size(0) == b && tail_k_in.size(3) == d, kOp, ": q is [B=", b, ", Hq, Q, D=", d,
              "] but the tail is ", tail_k_in.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, kOp, ": ", hq, " query heads are not a multiple of ", hkv, " KV heads");
  TORCH_CHECK(tl < block_size, kOp, ": tail_len ", tl, " must be < block_size ", block_size);

  // --- block table [B, Hkv, NB]
  TORCH_CHECK(tiers_in.dim() == 3 && tiers_in.size(0) == b && tiers_in.size(1) == hkv &&
                  tiers_in.scalar_type() == at::kChar,
              kOp, ": tiers must be int8 [B=", b, ", Hkv=", hkv, ", NB], got ", tiers_in.scalar_type(), " ",
              tiers_in.sizes());
  TORCH_CHECK(pages_in.sizes() == tiers_in.sizes() && pages_in.scalar_type() == at::kInt, kOp,
              ": pages must be int32 with the shape of tiers ", tiers_in.sizes(), ", got ", pages_in.scalar_type(), " ",
              pages_in.sizes());
  TORCH_CHECK(tiers_in.device() == device && pages_in.device() == device, kOp, ": tiers / pages are on ",
              tiers_in.device(), " / ", pages_in.device(), " but q is on ", device);
  const int64_t nb = tiers_in.size(2);
  const int64_t n = nb * block_size + tl;
  TORCH_CHECK(n < (int64_t{1} << 30), kOp, ": ", n, " cached positions is more than the kernel indexes (2^30)");
  TORCH_CHECK(nq >= 1 && nq <= n, kOp, ": Q = ", nq, " queries need 1 <= Q <= N = ", n,
              " cached positions (the queries are the Q newest positions)");

  // --- mask [B, Q, N]
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, kOp,
                ": mask must be bool (or uint8) [B, Q, N], got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 3 && mask.size(0) == b && mask.size(1) == nq && mask.size(2) == n, kOp,
                ": mask must be [B=", b, ", Q=", nq, ", N=", n, "], got ", mask.sizes());
    TORCH_CHECK(mask.device() == device, kOp, ": mask is on ", mask.device(), " but q is on ", device);
    if (mask.stride(2) != 1) mask = mask.contiguous();
  }

  // --- pools
  TORCH_CHECK(pools.size() == kNumSlots, kOp, ": pools must hold ", kNumSlots,
              " slots (kvprec.ops.native.DECODE_POOL_SLOTS), got ", pools.size());
  cuda::DecodeAttentionParams p;
  for (Tier tier : kAllTiers) {
    const PoolSlots& s = kSlots[tier_index(tier)];
    const std::optional<at::Tensor> k = slot(pools, s.k);
    if (!k.has_value()) {
      for (int other : {s.k_scale, s.k_zero, s.v, s.v_scale, s.v_zero}) {
        TORCH_CHECK(!slot(pools, other).has_value(), kOp, ": the ", tier_name(tier),
                    " pool has no k but slot ", other, " is set");
      }
      continue;
    }
    const int64_t pages = k->dim() == 3 ? k->size(0) : -1;
    TORCH_CHECK(pages >= 0 && pages < cuda::kDecodeMaxPoolPages, kOp, ": pool ", tier_name(tier),
                " k must be [P, T, width] with P < 2^28, got ", k->sizes());
    const int64_t width = tier_is_integer(tier) ? d * tier_bits(tier) / 8 : d;
    cuda::DecodePool& pool = p.pools[tier_index(tier)];
    pool.pages = pages;
    pool.k = checked_part(k, tier, "k", tier_dtype(tier), {pages, block_size, width}, device);
    pool.v = checked_part(slot(pools, s.v), tier, "v", tier_dtype(tier), {pages, block_size, width}, device);
    if (tier_is_integer(tier)) {
      const auto meta = [&](int index, const char* name, at::IntArrayRef shape) {
        return static_cast<const uint16_t*>(checked_part(slot(pools, index), tier, name, at::kHalf, shape, device));
      };
      pool.k_scale = meta(s.k_scale, "k_scale", {pages, d});
      pool.k_zero = meta(s.k_zero, "k_zero", {pages, d});
      pool.v_scale = meta(s.v_scale, "v_scale", {pages, block_size, d / group_size});
      pool.v_zero = meta(s.v_zero, "v_zero", {pages, block_size, d / group_size});
    }
  }

  // --- layouts the kernel reads with 16-byte copies / loads: small tensors are copied when they do not fit
  const auto rows_aligned = [](const at::Tensor& t) {
    const int64_t e = t.element_size();
    return t.stride(3) == 1 && aligned16(t.data_ptr()) && (t.stride(0) * e) % 16 == 0 && (t.stride(1) * e) % 16 == 0 &&
           (t.stride(2) * e) % 16 == 0;
  };
  const at::Tensor q = rows_aligned(q_in) ? q_in : q_in.contiguous();
  at::Tensor tail_k = tail_k_in, tail_v = tail_v_in;
  if (tl > 0 && !(rows_aligned(tail_k) && rows_aligned(tail_v) && tail_k.strides() == tail_v.strides())) {
    tail_k = tail_k.contiguous();
    tail_v = tail_v.contiguous();
  }
  const at::Tensor tiers = tiers_in.contiguous(), pages = pages_in.contiguous();

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({b, hq, nq, d}, q.options());
  at::Tensor lse = at::empty({b, hq, nq}, q.options().dtype(at::kFloat));
  const int64_t nbt = nb + (tl > 0 ? 1 : 0);
  at::Tensor mass = block_mass ? at::empty({b, hq, nq, nbt}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  if (b == 0 || hq == 0) return {out, lse, mass};

  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_q = q.stride(2);
  p.q_type = q.scalar_type() == at::kHalf ? cuda::FloatType::Float16 : cuda::FloatType::BFloat16;
  p.tiers = nb > 0 ? tiers.data_ptr<int8_t>() : nullptr;
  p.pages = nb > 0 ? pages.data_ptr<int32_t>() : nullptr;
  if (tl > 0) {
    p.tail_k = tail_k.data_ptr();
    p.tail_v = tail_v.data_ptr();
    p.tail_stride_b = tail_k.stride(0);
    p.tail_stride_h = tail_k.stride(1);
    p.tail_stride_t = tail_k.stride(2);
  }
  p.tail_type = tail_type;
  if (mask.defined()) {
    p.mask = static_cast<const uint8_t*>(mask.data_ptr());
    p.mask_stride_b = mask.stride(0);
    p.mask_stride_q = mask.stride(1);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.block_mass = block_mass ? mass.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(b);
  p.q_heads = static_cast<int>(hq);
  p.kv_heads = static_cast<int>(hkv);
  p.num_queries = static_cast<int>(nq);
  p.head_dim = static_cast<int>(d);
  p.block_size = static_cast<int>(block_size);
  p.group_size = static_cast<int>(group_size);
  p.num_blocks = static_cast<int>(nb);
  p.tail_len = static_cast<int>(tl);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.sliding_window = static_cast<int>(std::min<int64_t>(sliding_window, n));  // a window past N is no window

  cuda::DecodeAttentionPlan plan;
  const cudaError_t planned = cuda::plan_decode_attention(p, static_cast<int>(num_splits), device.index(), &plan);
  TORCH_CHECK(planned == cudaSuccess, kOp, ": no launch configuration for these inputs (", cudaGetErrorString(planned),
              "); B=", b, " Hq=", hq, " Hkv=", hkv, " Q=", nq, " D=", d, " T=", block_size, " N=", n);
  at::Tensor workspace = at::empty({plan.workspace_floats}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::decode_attention(p, plan, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {out, lse, mass};
}

}  // namespace kvprec
