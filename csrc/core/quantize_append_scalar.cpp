// quantize_append's inner loops (kvprec/cpu_quantize_loops.h) compiled for the scalar path: baseline ISA.
#include "kvprec/cpu_quantize_loops.h"

namespace kvprec::cpu {
const QuantizeLoops* scalar_quantize_loops() { return &kQuantizeLoops; }
}  // namespace kvprec::cpu
