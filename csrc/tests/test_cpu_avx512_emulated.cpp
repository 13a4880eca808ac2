// The AVX-512 CPU attention kernels without VNNI, emulated (cpu_avx512_emulated.h), against the AVX2 kernels.
#include "cpu_avx512_emulated.h"

int main() {
  run_emulated("test_cpu_avx512_emulated");
  return kvprec_test::finish("test_cpu_avx512_emulated");
}
