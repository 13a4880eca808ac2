// Which instruction set the CPU kernels run with (attention over a MixedPrecisionBuffer on the CPU,
// csrc/core/attention_cpu*.cpp). Torch-free.
//
// Paths (each a set of kernels compiled in its own translation unit with its own flags):
//   scalar       baseline x86-64 (SSE2) or any other architecture: the reference CPU kernels;
//   avx2         AVX2 + FMA + F16C;
//   avx512       AVX-512 F/BW/VL/DQ (plus FMA/F16C);
//   avx512_vnni  the same with AVX512_VNNI (integer dot products in one instruction).
// The path is chosen once, when the library is loaded: the best one this CPU runs (cpuid, and the OS saves the
// registers), or the one named by the environment variable KVPREC_CPU_ISA (auto | scalar | avx2 | avx512 |
// avx512_vnni). A name that is not a path, or a path this CPU or build lacks, is an error that every kernel call
// and active_cpu_isa() raise (the library still loads, so that the error is readable).
#pragma once

#include <cstdint>
#include <string>

namespace kvprec {

enum class CpuIsa : int8_t { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };
constexpr int kNumCpuIsas = 4;
constexpr CpuIsa kAllCpuIsas[kNumCpuIsas] = {CpuIsa::Scalar, CpuIsa::Avx2, CpuIsa::Avx512, CpuIsa::Avx512Vnni};

// "scalar", "avx2", "avx512", "avx512_vnni".
const char* cpu_isa_name(CpuIsa isa);
// The path named `name` ("auto": the best supported); throws std::invalid_argument naming the accepted names.
CpuIsa cpu_isa_from_name(const std::string& name);

// Empty when this build has the path's kernels and this CPU runs them; else why not (for skips and errors).
std::string cpu_isa_unsupported_reason(CpuIsa isa);
inline bool cpu_isa_supported(CpuIsa isa) { return cpu_isa_unsupported_reason(isa).empty(); }

// The path the CPU kernels use. Throws std::runtime_error when KVPREC_CPU_ISA asked for a path that cannot run.
CpuIsa active_cpu_isa();
// Switch the path for this process (tests and benchmarks); throws std::invalid_argument for an unsupported path.
// Not to be called while a kernel runs on another thread.
void set_cpu_isa(CpuIsa isa);

// CPU features the dispatcher saw, e.g. "avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16".
std::string cpu_features();

}  // namespace kvprec
