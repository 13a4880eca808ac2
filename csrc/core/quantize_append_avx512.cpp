// quantize_append's inner loops (kvprec/cpu_quantize_loops.h) compiled for the avx512 path: the AVX-512 flags of attention_cpu_avx512.cpp (CMakeLists.txt).
#include "kvprec/cpu_quantize_loops.h"

namespace kvprec::cpu {
const QuantizeLoops* avx512_quantize_loops() { return &kQuantizeLoops; }
}  // namespace kvprec::cpu
