// quantize_append's inner loops (kvprec/cpu_quantize_loops.h) compiled for the avx2 path: -mavx2 -mfma -mf16c (CMakeLists.txt).
#include "kvprec/cpu_quantize_loops.h"

namespace kvprec::cpu {
const QuantizeLoops* avx2_quantize_loops() { return &kQuantizeLoops; }
}  // namespace kvprec::cpu
