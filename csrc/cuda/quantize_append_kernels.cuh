// CUDA quantize_append, torch-free: whole blocks quantized straight into the pages of a pool (the buffer's seal
// path). Raw pointers, explicit sizes and strides, a stream, an error code. Same formats, bit for bit, as
// kvprec/ops/reference/quantize.py and csrc/core/quantize.cpp (see kvprec/quantize.h for the arguments' contract).
//
// One CTA per block, a single pass over the input:
//   1. load:   the [T, D] tile, 16-byte loads where the layout allows, into shared memory as FP32; each thread
//              keeps the largest FP32 bit pattern of |x| (the fused range check: NaN > inf > finite);
//   2. stats:  keys one thread per channel over the T rows; values one thread per (token, group), reading its
//              group from a rotated start so the threads of a warp hit different banks -> FP16 scale, zero
//              (global) and their FP32 values (shared);
//   3. encode: one thread per output byte reads PER = 8 / bits consecutive values (one 4/8/16-byte shared load),
//              encodes and packs them into a shared staging copy of the page;
//   4. store:  the page's packed codes, contiguous in the pool, with 16-byte stores; amax raised once per CTA
//              (warp max, then one atomicMax when it is larger than the value already there).
// Float tiers skip 2-4: each thread converts 16 bytes of input and stores them to the page.
// A negative page (or one >= num_pages) skips the CTA: nothing read, nothing written.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "quantize_kernels.cuh"  // InputType

namespace kvprec::cuda {

struct AppendArgs {
  const void* x = nullptr;     // [L0, L1, L2, T, D]: leading dims padded in front to three (size 1)
  InputType x_type = InputType::Float32;
  int64_t lead[3] = {1, 1, 1};
  int64_t lead_stride[3] = {0, 0, 0};  // element strides of the leading dims
  int64_t stride_t = 0;                // element stride between positions; unit stride along D
  int64_t t = 0, d = 0;
  const int64_t* pages = nullptr;      // [L0 * L1 * L2] on the device
  int64_t num_pages = 0;               // P: the pool's pages
  int bits = 0;                        // 8, 4, 2: integer tier; 0: float tier stored as out_type
  InputType out_type = InputType::Float16;
  bool keys = true;
  int64_t group_size = 0;              // values: channels per group (divides d)
  void* codes = nullptr;               // integer: uint8 [P, T, D*bits/8]; float: [P, T, D] of out_type
  uint16_t* scale = nullptr;           // integer: FP16 bits, keys [P, D], values [P, T, D/group_size]
  uint16_t* zero = nullptr;
  uint32_t* amax = nullptr;            // FP32 bits of max |x| (raised), or null
};

// Dynamic shared memory one CTA needs (0 for float tiers); the caller checks it against the device's limit.
size_t quantize_append_smem_bytes(const AppendArgs& a);

cudaError_t quantize_append(const AppendArgs& a, cudaStream_t stream);

}  // namespace kvprec::cuda
