// The AVX-512 + VNNI CPU attention kernels, emulated (cpu_avx512_emulated.h), against the AVX2 kernels.
#define KVPREC_AVX512_VNNI 1
#include "cpu_avx512_emulated.h"

int main() {
  run_emulated("test_cpu_avx512_vnni_emulated");
  return kvprec_test::finish("test_cpu_avx512_vnni_emulated");
}
