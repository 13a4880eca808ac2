// The AVX-512 (F/BW/VL/DQ) path of the CPU attention kernels: kvprec/cpu_simd_avx512.h's traits without VNNI.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (CMakeLists.txt); called only after the
// dispatcher (cpu_isa.cpp) has seen those features in cpuid and the OS saving the 512-bit state.
#include "kvprec/cpu_simd_avx512.h"

#include "kvprec/cpu_attention_simd.h"

namespace kvprec::cpu {
const Kernels* avx512_kernels() { return &kSimdKernels; }
}  // namespace kvprec::cpu
