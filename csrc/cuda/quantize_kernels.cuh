// CUDA quantizers for the integer tiers, torch-free: raw pointers, explicit sizes, a stream, an error code.
// Same algorithm and bit layout as csrc/core/quantize.cpp and kvprec/ops/reference/quantize.py (see kvprec/quantize.h):
// zero = fp16_round_down(min), scale = fp16_round_up((max - zero) / qmax), code = rint((x - zero) / scale),
// x' = code * scale + zero with IEEE division and no fused multiply-add, so results are bit-identical.
//
// Two passes (whole blocks sealed on append take the fused single pass of quantize_append_kernels.cuh instead):
//   1. stats:  one thread per quantization group -> scale, zero (FP16);
//   2. encode: one thread per output byte -> packed codes (INT4: two, INT2: four codes per byte).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvprec::cuda {

enum class InputType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Which axis a quantization group spans in x [N, T, D] (contiguous):
//   Keys:   one group per (n, channel), over the T positions;
//   Values: one group per (n, token, g), over group_size consecutive channels.
enum class GroupAxis : int { Keys = 0, Values = 1 };

// x [N, T, D] of `in_type` -> packed uint8 [N, T, D*bits/8], scale/zero FP16 (raw uint16 bits):
// keys [N, D], values [N, T, D/group_size]. bits in {8, 4, 2}.
cudaError_t quantize(const void* x, InputType in_type, int64_t n, int64_t t, int64_t d, int bits, GroupAxis axis,
                     int64_t group_size, uint8_t* packed, uint16_t* scale, uint16_t* zero, cudaStream_t stream);

// packed codes + scale/zero -> out [N, T, D] of `out_type`.
cudaError_t dequantize(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero, int64_t n, int64_t t,
                       int64_t d, int bits, GroupAxis axis, int64_t group_size, void* out, InputType out_type,
                       cudaStream_t stream);

}  // namespace kvprec::cuda
