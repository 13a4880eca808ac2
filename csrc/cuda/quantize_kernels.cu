// See quantize_kernels.cuh. Arithmetic is spelled with __fdiv_rn / __fmul_rn / __fadd_rn so that nvcc never
// contracts it into a fused multiply-add or an approximate division: bit-identical to the CPU reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fp16_rounding.cuh"
#include "quantize_kernels.cuh"

namespace kvprec::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const void* x, InputType type, int64_t i) {
  switch (type) {
    case InputType::Float16: return __half2float(static_cast<const __half*>(x)[i]);
    case InputType::BFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* out, InputType type, int64_t i, float v) {
  switch (type) {
    case InputType::Float16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    case InputType::BFloat16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(out)[i] = v;
  }
}

// Element index of member i of group g, for x [N, T, D] contiguous.
struct GroupIndex {
  int64_t t, d, group_size;
  GroupAxis axis;
  __device__ __forceinline__ int64_t count() const { return axis == GroupAxis::Keys ? t : group_size; }
  __device__ __forceinline__ int64_t element(int64_t g, int64_t i) const {
    if (axis == GroupAxis::Keys) {  // g = n * D + channel
      const int64_t n = g / d, c = g % d;
      return (n * t + i) * d + c;
    }
    return g * group_size + i;  // g = (n * T + token) * (D / G) + group: contiguous channels
  }
  // The group that element e (flat index into [N, T, D]) belongs to.
  __device__ __forceinline__ int64_t group_of(int64_t e) const {
    if (axis == GroupAxis::Keys) return (e / (t * d)) * d + e % d;
    return e / group_size;
  }
};

__global__ void stats_kernel(const void* x, InputType in_type, GroupIndex gi, int64_t groups, int qmax,
                             uint16_t* scale, uint16_t* zero) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  float mn = __int_as_float(0x7f800000), mx = -mn;
  const int64_t count = gi.count();
  for (int64_t i = 0; i < count; ++i) {
    const float v = load_as_float(x, in_type, gi.element(g, i));
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  mn = __fadd_rn(mn, 0.0f);  // -0 -> +0: the stored bits must not depend on which zero came first
  mx = __fadd_rn(mx, 0.0f);
  const uint16_t z = fp16_round_down_bits(mn);
  const float s = __fdiv_rn(__fsub_rn(mx, half_bits_to_float(z)), static_cast<float>(qmax));
  zero[g] = z;
  scale[g] = fp16_round_up_bits(s);
}

__global__ void encode_kernel(const void* x, InputType in_type, GroupIndex gi, int64_t out_bytes, int bits, int qmax,
                              const uint16_t* scale, const uint16_t* zero, uint8_t* packed) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= out_bytes) return;
  const int per_byte = 8 / bits;
  uint8_t byte = 0;
  for (int k = 0; k < per_byte; ++k) {
    const int64_t e = j * per_byte + k;  // packing runs along head_dim, the innermost axis
    const int64_t g = gi.group_of(e);
    const float sf = half_bits_to_float(scale[g]), zf = half_bits_to_float(zero[g]);
    float c = 0.0f;
    if (sf > 0.0f) {
      c = rintf(__fdiv_rn(__fsub_rn(load_as_float(x, in_type, e), zf), sf));
      c = fminf(fmaxf(c, 0.0f), static_cast<float>(qmax));
    }
    byte |= static_cast<uint8_t>(static_cast<uint32_t>(c) << (bits * k));
  }
  packed[j] = byte;
}

__global__ void decode_kernel(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, GroupIndex gi,
                              int64_t elements, int bits, void* out, InputType out_type) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= elements) return;
  const int per_byte = 8 / bits;
  const uint32_t code = (packed[e / per_byte] >> (bits * (e % per_byte))) & ((1u << bits) - 1u);
  const int64_t g = gi.group_of(e);
  float y = __fadd_rn(__fmul_rn(static_cast<float>(code), half_bits_to_float(scale[g])),
                      half_bits_to_float(zero[g]));
  y = fminf(fmaxf(y, -65504.0f), 65504.0f);  // the input contract |x| <= 65504: an FP16 cast stays finite
  store_from_float(out, out_type, e, y);
}

unsigned grid_for(int64_t items) { return static_cast<unsigned>((items + kThreads - 1) / kThreads); }

bool valid_bits(int bits) { return bits == 8 || bits == 4 || bits == 2; }

}  // namespace

cudaError_t quantize(const void* x, InputType in_type, int64_t n, int64_t t, int64_t d, int bits, GroupAxis axis,
                     int64_t group_size, uint8_t* packed, uint16_t* scale, uint16_t* zero, cudaStream_t stream) {
  if (!valid_bits(bits) || d % (8 / bits) != 0 || (axis == GroupAxis::Values && (group_size <= 0 || d % group_size)))
    return cudaErrorInvalidValue;
  if (n * t * d == 0) return cudaSuccess;
  const GroupIndex gi{t, d, group_size, axis};
  const int64_t groups = axis == GroupAxis::Keys ? n * d : n * t * (d / group_size);
  const int qmax = (1 << bits) - 1;
  stats_kernel<<<grid_for(groups), kThreads, 0, stream>>>(x, in_type, gi, groups, qmax, scale, zero);
  const int64_t out_bytes = n * t * d * bits / 8;
  encode_kernel<<<grid_for(out_bytes), kThreads, 0, stream>>>(x, in_type, gi, out_bytes, bits, qmax, scale, zero,
                                                              packed);
  return cudaGetLastError();
}

cudaError_t dequantize(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t n, int64_t t,
                       int64_t d, int bits, GroupAxis axis, int64_t group_size, void* out, InputType out_type,
                       cudaStream_t stream) {
  if (!valid_bits(bits) || d % (8 / bits) != 0 || (axis == GroupAxis::Values && (group_size <= 0 || d % group_size)))
    return cudaErrorInvalidValue;
  const int64_t elements = n * t * d;
  if (elements == 0) return cudaSuccess;
  const GroupIndex gi{t, d, group_size, axis};
  decode_kernel<<<grid_for(elements), kThreads, 0, stream>>>(packed, scale, zero, gi, elements, bits, out, out_type);
  return cudaGetLastError();
}

}  // namespace kvprec::cuda
