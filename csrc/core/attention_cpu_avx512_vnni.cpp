// The AVX-512 + VNNI path of the CPU attention kernels: kvprec/cpu_simd_avx512.h's traits with the integer dot
// products as vpdpbusd (INT4 / INT2 keys) and vpdpwssd (INT8 keys). Compiled with the flags of
// attention_cpu_avx512.cpp plus -mavx512vnni (CMakeLists.txt).
#define KVPREC_AVX512_VNNI 1
#include "kvprec/cpu_simd_avx512.h"

#include "kvprec/cpu_attention_simd.h"

namespace kvprec::cpu {
const Kernels* avx512_vnni_kernels() { return &kSimdKernels; }
}  // namespace kvprec::cpu
