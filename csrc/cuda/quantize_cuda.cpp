// ATen side of the CUDA quantizers: checks, allocation, the current stream, and the torch-free launchers in
// quantize_kernels.cu. Compiled only when KVPREC_WITH_CUDA (CMake KVPREC_CUDA=AUTO|ON finds CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kvprec/quantize.h"
#include "quantize_append_kernels.cuh"
#include "quantize_kernels.cuh"

namespace kvprec {
namespace {

cuda::InputType input_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::InputType::Float32;
    case at::kHalf: return cuda::InputType::Float16;
    case at::kBFloat16: return cuda::InputType::BFloat16;
    default: TORCH_CHECK(false, "kvprec CUDA quantizer: dtype ", t, " is not accepted; use float32, float16 or bfloat16");
  }
}

uint16_t* half_bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::Half>()); }
const uint16_t* half_bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

QuantizedBlock quantize_cuda(const at::Tensor& x_in, Tier tier, cuda::GroupAxis axis, int64_t group_size,
                             const char* what) {
  TORCH_CHECK(x_in.is_cuda(), what, ": expected a CUDA tensor");
  TORCH_CHECK(x_in.dim() == 3, what, ": expected a [N, T, D] tensor, got shape ", x_in.sizes());
  if (!tier_is_integer(tier)) return {store_float(x_in, tier, what), {}, {}};
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  if (x.numel() > 0) {  // the same contract as the CPU kernels: finite and FP16-representable magnitudes
    const float amax = x.abs().max().item<float>();
    TORCH_CHECK(std::isfinite(amax) && amax <= 65504.0f, what,
                ": integer tiers store FP16 scales, so values must be finite with |x| <= 65504; got max |x| = ", amax);
  }
  const int64_t n = x.size(0), t = x.size(1), d = x.size(2);
  TORCH_CHECK(axis == cuda::GroupAxis::Keys || (group_size > 0 && d % group_size == 0), what, ": group_size ",
              group_size, " must divide head_dim ", d);
  auto opts = x.options();
  at::Tensor packed = at::empty({n, t, d * tier_bits(tier) / 8}, opts.dtype(at::kByte));
  auto meta_shape = axis == cuda::GroupAxis::Keys ? std::vector<int64_t>{n, d} : std::vector<int64_t>{n, t, d / group_size};
  at::Tensor scale = at::empty(meta_shape, opts.dtype(at::kHalf)), zero = at::empty(meta_shape, opts.dtype(at::kHalf));
  C10_CUDA_CHECK(cuda::quantize(x.data_ptr(), input_type(x.scalar_type()), n, t, d, tier_bits(tier), axis, group_size,
                                packed.data_ptr<uint8_t>(), half_bits(scale), half_bits(zero),
                                c10::cuda::getCurrentCUDAStream()));
  return {packed, scale, zero};
}

at::Tensor dequantize_cuda(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype,
                           cuda::GroupAxis axis, int64_t group_size) {
  if (!tier_is_integer(tier)) return q.codes.to(dtype, false, true);
  TORCH_CHECK(q.codes.is_cuda() && q.scale.is_cuda() && q.zero.is_cuda(), "dequantize: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(q.codes.device());
  at::Tensor codes = q.codes.contiguous(), scale = q.scale.contiguous(), zero = q.zero.contiguous();
  const int64_t n = codes.size(0), t = codes.size(1);
  TORCH_CHECK(codes.size(2) * tier_codes_per_byte(tier) == head_dim, "dequantize: codes do not hold head_dim ",
              head_dim, " values of ", tier_name(tier));
  at::Tensor out = at::empty({n, t, head_dim}, codes.options().dtype(dtype));
  C10_CUDA_CHECK(cuda::dequantize(codes.data_ptr<uint8_t>(), half_bits(scale), half_bits(zero), n, t, head_dim,
                                  tier_bits(tier), axis, group_size, out.data_ptr(), input_type(dtype),
                                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

QuantizedBlock quantize_keys_cuda(const at::Tensor& x, Tier tier) {
  return quantize_cuda(x, tier, cuda::GroupAxis::Keys, 0, "quantize_keys: x");
}

QuantizedBlock quantize_values_cuda(const at::Tensor& x, Tier tier, int64_t group_size) {
  return quantize_cuda(x, tier, cuda::GroupAxis::Values, group_size, "quantize_values: x");
}

at::Tensor dequantize_keys_cuda(const QuantizedBlock& q, Tier tier, int64_t head_dim, at::ScalarType dtype) {
  return dequantize_cuda(q, tier, head_dim, dtype, cuda::GroupAxis::Keys, 0);
}

at::Tensor dequantize_values_cuda(const QuantizedBlock& q, Tier tier, int64_t head_dim, int64_t group_size,
                                  at::ScalarType dtype) {
  return dequantize_cuda(q, tier, head_dim, dtype, cuda::GroupAxis::Values, group_size);
}

void quantize_append_cuda(const at::Tensor& x_in, Tier tier, bool keys, int64_t group_size, const at::Tensor& pages,
                          const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                          const at::Tensor& amax) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Rows are read with unit stride; any layout of the leading dims and positions is read in place.
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  at::Tensor pg = pages.reshape({-1}).to(at::kLong).contiguous();
  // Host pages (the buffer's case) go up through pinned memory without blocking: no synchronisation here.
  if (pg.is_cpu()) pg = pg.pin_memory().to(x.device(), /*non_blocking=*/true);
  cuda::AppendArgs a;
  a.x = x.const_data_ptr();
  a.x_type = input_type(x.scalar_type());
  const int64_t nl = x.dim() - 2;
  for (int64_t k = 0; k < nl; ++k) {
    a.lead[3 - nl + k] = x.size(k);
    a.lead_stride[3 - nl + k] = x.stride(k);
  }
  a.stride_t = x.stride(-2);
  a.t = x.size(-2);
  a.d = x.size(-1);
  a.pages = pg.const_data_ptr<int64_t>();
  a.num_pages = codes.size(0);
  a.keys = keys;
  a.group_size = keys ? 0 : group_size;
  a.codes = codes.data_ptr();
  if (tier_is_integer(tier)) {
    a.bits = tier_bits(tier);
    a.scale = reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>());
    a.zero = reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>());
  } else {
    a.bits = 0;
    a.out_type = input_type(tier_float_dtype(tier));
  }
  a.amax = amax.defined() ? reinterpret_cast<uint32_t*>(amax.data_ptr<float>()) : nullptr;
  const size_t smem = cuda::quantize_append_smem_bytes(a);
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(optin), "quantize_append (cuda): a block of block_size ", a.t,
                    " x head_dim ", a.d, " needs ", smem, " bytes of shared memory; this GPU allows ", optin,
                    " per CTA (use the triton backend for such blocks)");
  C10_CUDA_CHECK(cuda::quantize_append(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace kvprec
