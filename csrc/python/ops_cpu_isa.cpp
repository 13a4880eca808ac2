// Registration of the CPU instruction-set ops (kvprec/cpu_isa.h):
//   kvprec::cpu_isa() -> str            the path the CPU kernels use ("scalar", "avx2", "avx512", "avx512_vnni"):
//                                       chosen at load from cpuid or KVPREC_CPU_ISA; raises if that names a path
//                                       that cannot run here;
//   kvprec::set_cpu_isa(str name) -> str   switch the path for this process (tests, benchmarks): auto, scalar, avx2,
//                                       avx512 or avx512_vnni; returns the path now in use; raises ValueError naming
//                                       what this CPU lacks;
//   kvprec::cpu_isa_unsupported(str name) -> str   "" when the path runs here, else why not;
//   kvprec::cpu_features() -> str       the CPU features the dispatcher saw.
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "kvprec/cpu_isa.h"

namespace {

std::string active() {
  try {
    return kvprec::cpu_isa_name(kvprec::active_cpu_isa());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

kvprec::CpuIsa parse(const std::string& name) {
  try {
    return kvprec::cpu_isa_from_name(name);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "name: ", e.what());
  }
}

std::string set(const std::string& name) {
  const kvprec::CpuIsa isa = parse(name);
  try {
    kvprec::set_cpu_isa(isa);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return kvprec::cpu_isa_name(isa);
}

std::string unsupported(const std::string& name) { return kvprec::cpu_isa_unsupported_reason(parse(name)); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvprec, m) {
  m.def("cpu_isa() -> str", &active);
  m.def("set_cpu_isa(str name) -> str", &set);
  m.def("cpu_isa_unsupported(str name) -> str", &unsupported);
  m.def("cpu_features() -> str", [] { return kvprec::cpu_features(); });
}
