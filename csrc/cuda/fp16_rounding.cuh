// FP16 rounding toward -inf / +inf on the device, shared by the CUDA quantizers (quantize_kernels.cu,
// quantize_append_kernels.cu). The same steps as fp16_round_down/up in csrc/core/quantize.cpp: round to nearest,
// then one bit-pattern step where that went the wrong way. zero = round_down(min) and scale = round_up(range / qmax)
// are what make |x - x'| <= scale / 2 hold (kvprec/ops/reference/quantize.py).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kvprec::cuda {

__device__ __forceinline__ float half_bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }

// Largest FP16 <= x, as raw bits.
__device__ __forceinline__ uint16_t fp16_round_down_bits(float x) {
  uint16_t b = __half_as_ushort(__float2half_rn(x));
  if (half_bits_to_float(b) > x) {
    if (b == 0x0000 || b == 0x8000) b = 0x8001;
    else if (b & 0x8000) b = static_cast<uint16_t>(b + 1);
    else b = static_cast<uint16_t>(b - 1);
  }
  return b;
}

// Smallest FP16 >= x, as raw bits.
__device__ __forceinline__ uint16_t fp16_round_up_bits(float x) {
  uint16_t b = __half_as_ushort(__float2half_rn(x));
  if (half_bits_to_float(b) < x) {
    if (b == 0x0000 || b == 0x8000) b = 0x0001;
    else if (b & 0x8000) b = static_cast<uint16_t>(b - 1);
    else b = static_cast<uint16_t>(b + 1);
  }
  return b;
}

}  // namespace kvprec::cuda
