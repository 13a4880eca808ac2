// See quantize_append_kernels.cuh. The arithmetic is spelled with __fdiv_rn / __fsub_rn / __fadd_rn, as in
// quantize_kernels.cu, so that nvcc never contracts it or divides approximately: bit-identical to the CPU
// reference (csrc/core/quantize.cpp) and to kvprec/ops/reference/quantize.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "fp16_rounding.cuh"
#include "quantize_append_kernels.cuh"

namespace kvprec::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Io;
template <>
struct Io<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Io<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// N elements moved as aligned vectors (up to 16 bytes: one ld/st.v2/v4; 32 bytes: two st.v4).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// The FP32 bit pattern of |v|: an integer max over these is a NaN-propagating max of |v| (NaN > inf > finite).
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) & ~static_cast<size_t>(15); }

// Dynamic shared memory of the integer kernel: FP32 tile [T*D] | FP32 scale, zero [NS] each | packed page.
struct Layout {
  size_t meta, staged, total;
};

__host__ __device__ __forceinline__ Layout layout(int64_t t, int64_t d, bool keys, int64_t group_size, int bits) {
  const int64_t ns = keys ? d : t * (d / group_size);
  Layout l;
  l.meta = align16(static_cast<size_t>(t * d) * sizeof(float));
  l.staged = l.meta + align16(static_cast<size_t>(2 * ns) * sizeof(float));
  l.total = l.staged + align16(static_cast<size_t>(t * d * bits / 8));
  return l;
}

__device__ __forceinline__ int64_t block_offset(const AppendArgs& a, int64_t i) {
  const int64_t i2 = i % a.lead[2], i1 = (i / a.lead[2]) % a.lead[1], i0 = i / (a.lead[1] * a.lead[2]);
  return i0 * a.lead_stride[0] + i1 * a.lead_stride[1] + i2 * a.lead_stride[2];
}

// Block-wide max of one value per thread, raised into *amax with one atomic (skipped when not larger). Called
// by every thread of the CTA; contains a __syncthreads.
__device__ __forceinline__ void raise_amax(uint32_t m, uint32_t* amax, uint32_t* warp_max) {
  m = __reduce_max_sync(0xffffffffu, m);
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t v = threadIdx.x < kWarps ? warp_max[threadIdx.x] : 0u;
    v = __reduce_max_sync(0xffffffffu, v);
    if (threadIdx.x == 0 && v > __ldcg(amax)) atomicMax(amax, v);
  }
}

// FP16 zero and scale of one group from its FP32 min / max; FP32 copies to shared, bits to the page.
__device__ __forceinline__ void finish_group(float mn, float mx, int qmax, float* s_sh, float* z_sh, uint16_t* s_out,
                                             uint16_t* z_out) {
  mn = __fadd_rn(mn, 0.0f);  // -0 -> +0: the stored bits must not depend on which zero came first
  mx = __fadd_rn(mx, 0.0f);
  const uint16_t z = fp16_round_down_bits(mn);
  const float zf = half_bits_to_float(z);
  const uint16_t s = fp16_round_up_bits(__fdiv_rn(__fsub_rn(mx, zf), static_cast<float>(qmax)));
  *s_sh = half_bits_to_float(s);
  *z_sh = zf;
  *s_out = s;
  *z_out = z;
}

template <typename in_t, int BITS, bool KEYS>
__global__ void __launch_bounds__(kThreads) append_int_kernel(const AppendArgs a, const bool vec_load,
                                                              const bool vec_store) {
  constexpr int PER = 8 / BITS;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr int VEC = 16 / sizeof(in_t);
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint32_t warp_max[kWarps];

  const int64_t page = a.pages[blockIdx.x];
  if (page < 0 || page >= a.num_pages) return;  // the whole CTA leaves: no barrier is skipped by half of it
  const int T = static_cast<int>(a.t), D = static_cast<int>(a.d), TD = T * D;
  const int G = KEYS ? 1 : static_cast<int>(a.group_size), NG = D / G;
  const int NS = KEYS ? D : T * NG;
  const Layout l = layout(T, D, KEYS, G, BITS);
  float* tile = reinterpret_cast<float*>(smem);
  float* s_sh = reinterpret_cast<float*>(smem + l.meta);
  float* z_sh = s_sh + NS;
  uint8_t* staged = smem + l.staged;
  const in_t* xb = static_cast<const in_t*>(a.x) + block_offset(a, blockIdx.x);

  // 1. load the tile once (FP32 in shared memory) and the largest |x| of this thread
  uint32_t m = 0;
  if (vec_load) {
    const int cpr = D / VEC, chunks = T * cpr;
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const int r = c / cpr, col = (c - r * cpr) * VEC;
      const Pack<in_t, VEC> p = *reinterpret_cast<const Pack<in_t, VEC>*>(xb + r * a.stride_t + col);
      Pack<float, VEC> f;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        f.v[k] = Io<in_t>::to_float(p.v[k]);
        m = max(m, abs_bits(f.v[k]));
      }
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q)
        reinterpret_cast<float4*>(tile + r * D + col)[q] = make_float4(f.v[4 * q], f.v[4 * q + 1], f.v[4 * q + 2],
                                                                        f.v[4 * q + 3]);
    }
  } else {
    for (int e = threadIdx.x; e < TD; e += kThreads) {
      const int r = e / D, col = e - r * D;
      const float v = Io<in_t>::to_float(xb[r * a.stride_t + col]);
      tile[e] = v;
      m = max(m, abs_bits(v));
    }
  }
  if (a.amax != nullptr) raise_amax(m, a.amax, warp_max);  // uniform branch; it synchronises the CTA
  else __syncthreads();

  // 2. per-group FP16 scale and zero
  if (KEYS) {
    uint16_t* s_out = a.scale + page * D;
    uint16_t* z_out = a.zero + page * D;
    for (int c = threadIdx.x; c < D; c += kThreads) {
      float mn = tile[c], mx = mn;
      for (int r = 1; r < T; ++r) {
        const float v = tile[r * D + c];
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
      }
      finish_group(mn, mx, QMAX, s_sh + c, z_sh + c, s_out + c, z_out + c);
    }
  } else {
    uint16_t* s_out = a.scale + page * NS;
    uint16_t* z_out = a.zero + page * NS;
    for (int g = threadIdx.x; g < NS; g += kThreads) {
      const float* gp = tile + g * G;  // group (token r, group j) = channels [j*G, (j+1)*G) of row r: g * G
      int k = g % G;                   // rotated start: neighbouring threads read different banks
      float mn = gp[k], mx = mn;
      for (int j = 1; j < G; ++j) {
        if (++k == G) k = 0;
        mn = fminf(mn, gp[k]);
        mx = fmaxf(mx, gp[k]);
      }
      finish_group(mn, mx, QMAX, s_sh + g, z_sh + g, s_out + g, z_out + g);
    }
  }
  __syncthreads();

  // 3. encode and pack one byte per thread (PER consecutive values along D: one shared load of 4/8/16 bytes)
  const int nbytes = TD / PER;
  for (int b = threadIdx.x; b < nbytes; b += kThreads) {
    const int e0 = b * PER, r = e0 / D, c0 = e0 - r * D;
    const Pack<float, PER> v = *reinterpret_cast<const Pack<float, PER>*>(tile + e0);
    uint32_t byte = 0;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int idx = KEYS ? c0 + k : r * NG + (c0 + k) / G;
      const float sf = s_sh[idx], zf = z_sh[idx];
      float c = 0.0f;
      if (sf > 0.0f) {
        c = rintf(__fdiv_rn(__fsub_rn(v.v[k], zf), sf));
        c = fminf(fmaxf(c, 0.0f), static_cast<float>(QMAX));
      }
      byte |= static_cast<uint32_t>(c) << (BITS * k);
    }
    staged[b] = static_cast<uint8_t>(byte);
  }
  __syncthreads();

  // 4. the page's codes are contiguous in the pool: 16-byte stores
  uint8_t* dst = static_cast<uint8_t*>(a.codes) + page * nbytes;
  if (vec_store) {
    for (int c = threadIdx.x; c < nbytes / 16; c += kThreads)
      reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(staged)[c];
  } else {
    for (int b = threadIdx.x; b < nbytes; b += kThreads) dst[b] = staged[b];
  }
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) append_float_kernel(const AppendArgs a, const bool vec) {
  constexpr int VEC = 16 / sizeof(in_t);
  __shared__ uint32_t warp_max[kWarps];
  const int64_t page = a.pages[blockIdx.x];
  if (page < 0 || page >= a.num_pages) return;
  const int T = static_cast<int>(a.t), D = static_cast<int>(a.d);
  const in_t* xb = static_cast<const in_t*>(a.x) + block_offset(a, blockIdx.x);
  out_t* out = static_cast<out_t*>(a.codes) + page * static_cast<int64_t>(T) * D;
  uint32_t m = 0;
  if (vec) {
    const int cpr = D / VEC, chunks = T * cpr;
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const int r = c / cpr, col = (c - r * cpr) * VEC;
      const Pack<in_t, VEC> p = *reinterpret_cast<const Pack<in_t, VEC>*>(xb + r * a.stride_t + col);
      Pack<out_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float v = Io<in_t>::to_float(p.v[k]);
        m = max(m, abs_bits(v));
        o.v[k] = Io<out_t>::from_float(v);
      }
      *reinterpret_cast<Pack<out_t, VEC>*>(out + r * D + col) = o;
    }
  } else {
    for (int e = threadIdx.x; e < T * D; e += kThreads) {
      const int r = e / D, col = e - r * D;
      const float v = Io<in_t>::to_float(xb[r * a.stride_t + col]);
      m = max(m, abs_bits(v));
      out[e] = Io<out_t>::from_float(v);
    }
  }
  if (a.amax != nullptr) raise_amax(m, a.amax, warp_max);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, const AppendArgs& a, unsigned grid, size_t smem, cudaStream_t stream, bool v1,
                   bool v2) {
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, kThreads, smem, stream>>>(a, v1, v2);
  return cudaGetLastError();
}

template <typename in_t, int BITS>
cudaError_t launch_int(const AppendArgs& a, unsigned grid, size_t smem, cudaStream_t s, bool vl, bool vs) {
  return a.keys ? launch(append_int_kernel<in_t, BITS, true>, a, grid, smem, s, vl, vs)
                : launch(append_int_kernel<in_t, BITS, false>, a, grid, smem, s, vl, vs);
}

template <typename in_t>
cudaError_t dispatch(const AppendArgs& a, unsigned grid, size_t smem, cudaStream_t s, bool vl, bool vs) {
  switch (a.bits) {
    case 8: return launch_int<in_t, 8>(a, grid, smem, s, vl, vs);
    case 4: return launch_int<in_t, 4>(a, grid, smem, s, vl, vs);
    case 2: return launch_int<in_t, 2>(a, grid, smem, s, vl, vs);
    default: break;
  }
  // float tiers: vl covers the input and the output alignment
  switch (a.out_type) {
    case InputType::Float32: append_float_kernel<in_t, float><<<grid, kThreads, 0, s>>>(a, vl); break;
    case InputType::Float16: append_float_kernel<in_t, __half><<<grid, kThreads, 0, s>>>(a, vl); break;
    default: append_float_kernel<in_t, __nv_bfloat16><<<grid, kThreads, 0, s>>>(a, vl);
  }
  return cudaGetLastError();
}

size_t elem_size(InputType t) { return t == InputType::Float32 ? 4 : 2; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

size_t quantize_append_smem_bytes(const AppendArgs& a) {
  if (a.bits == 0) return 0;
  return layout(a.t, a.d, a.keys, a.keys ? 1 : a.group_size, a.bits).total;
}

cudaError_t quantize_append(const AppendArgs& a, cudaStream_t stream) {
  const bool integer = a.bits == 8 || a.bits == 4 || a.bits == 2;
  if (!(integer || a.bits == 0) || a.t <= 0 || a.d <= 0 || a.t * a.d > INT_MAX / 4 ||
      (integer && a.d % (8 / a.bits) != 0) ||
      (integer && !a.keys && (a.group_size <= 0 || a.d % a.group_size != 0)))
    return cudaErrorInvalidValue;
  const int64_t n = a.lead[0] * a.lead[1] * a.lead[2];
  if (n == 0) return cudaSuccess;
  if (n > INT_MAX) return cudaErrorInvalidValue;
  // 16-byte loads need every row start 16-byte aligned: the base pointer, D, the position stride and the strides
  // of the leading dims (where they are used) in multiples of 16 bytes.
  const int64_t es = static_cast<int64_t>(elem_size(a.x_type));
  bool vec_load = aligned16(a.x) && (a.d * es) % 16 == 0 && (a.stride_t * es) % 16 == 0;
  for (int k = 0; k < 3; ++k) vec_load = vec_load && (a.lead[k] == 1 || (a.lead_stride[k] * es) % 16 == 0);
  bool vec_store;
  if (integer) {
    vec_store = aligned16(a.codes) && (a.t * a.d * a.bits / 8) % 16 == 0;
  } else {  // each thread stores 16/es elements of the output type: aligned when the page and row starts are
    vec_load = vec_load && aligned16(a.codes);
    vec_store = vec_load;
  }
  const unsigned grid = static_cast<unsigned>(n);
  const size_t smem = quantize_append_smem_bytes(a);
  switch (a.x_type) {
    case InputType::Float16: return dispatch<__half>(a, grid, smem, stream, vec_load, vec_store);
    case InputType::BFloat16: return dispatch<__nv_bfloat16>(a, grid, smem, stream, vec_load, vec_store);
    default: return dispatch<float>(a, grid, smem, stream, vec_load, vec_store);
  }
}

}  // namespace kvprec::cuda
