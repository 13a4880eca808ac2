// The CPU instruction-set dispatcher (kvprec/cpu_isa.h): cpuid and xgetbv read once at library load, the path
// chosen then (or named by KVPREC_CPU_ISA), and the kernel table of that path (kvprec/cpu_kernels.h).
// The per-ISA translation units exist only where the compiler takes their flags: CMakeLists.txt defines
// KVPREC_HAVE_AVX2 / KVPREC_HAVE_AVX512 when it compiles them.
#include "kvprec/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kvprec/cpu_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace kvprec {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false;                             // + the OS saves YMM state
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;  // + the OS saves ZMM / mask state
  bool avx512_vnni = false, avx512_bf16 = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;     // SSE and AVX state
  const bool zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!ymm_state || __get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.fma = fma;
  f.f16c = f16c;
  if (zmm_state) {
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    f.avx512_bf16 = a1 & (1u << 5);
  }
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

const cpu::Kernels* table(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return cpu::scalar_kernels();
#ifdef KVPREC_HAVE_AVX2
    case CpuIsa::Avx2: return cpu::avx2_kernels();
#endif
#ifdef KVPREC_HAVE_AVX512
    case CpuIsa::Avx512: return cpu::avx512_kernels();
    case CpuIsa::Avx512Vnni: return cpu::avx512_vnni_kernels();
#endif
    default: return nullptr;
  }
}

CpuIsa best_supported() {
  for (CpuIsa isa : {CpuIsa::Avx512Vnni, CpuIsa::Avx512, CpuIsa::Avx2})
    if (cpu_isa_supported(isa)) return isa;
  return CpuIsa::Scalar;
}

// The choice made at load: the path, or the error every use raises.
struct Choice {
  std::atomic<int> isa{static_cast<int>(CpuIsa::Scalar)};
  std::string error;
  Choice() {
    const char* env = std::getenv("KVPREC_CPU_ISA");
    const std::string name = env && *env ? env : "auto";
    try {
      const CpuIsa want = cpu_isa_from_name(name);
      const std::string why = cpu_isa_unsupported_reason(want);
      if (!why.empty())
        error = "KVPREC_CPU_ISA=" + name + " asks for a CPU path that cannot run here: " + why +
                " (unset it, or use auto, or one of the supported paths)";
      else isa = static_cast<int>(want);
    } catch (const std::invalid_argument& e) {
      error = std::string("KVPREC_CPU_ISA: ") + e.what();
    }
  }
};

Choice& choice() {
  static Choice c;
  return c;
}
// Chosen at load (a static initializer), not at the first kernel call.
[[maybe_unused]] const bool chosen_at_load = (choice(), true);

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return "scalar";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx512Vnni: return "avx512_vnni";
  }
  return "?";
}

CpuIsa cpu_isa_from_name(const std::string& name) {
  if (name == "auto") return best_supported();
  for (CpuIsa isa : kAllCpuIsas)
    if (name == cpu_isa_name(isa)) return isa;
  throw std::invalid_argument("'" + name + "' is not a CPU path; accepted auto, scalar, avx2, avx512, avx512_vnni");
}

std::string cpu_isa_unsupported_reason(CpuIsa isa) {
  if (table(isa) == nullptr)
    return std::string("this build has no ") + cpu_isa_name(isa) + " kernels (the compiler lacks its flags, or the "
           "target is not x86-64)";
  const Features& f = features();
  std::string missing;
  auto need = [&](bool have, const char* what) {
    if (!have) missing += std::string(missing.empty() ? "" : " ") + what;
  };
  if (isa != CpuIsa::Scalar) {
    need(f.avx2, "avx2");
    need(f.fma, "fma");
    need(f.f16c, "f16c");
  }
  if (isa == CpuIsa::Avx512 || isa == CpuIsa::Avx512Vnni) {
    need(f.avx512f, "avx512f");
    need(f.avx512bw, "avx512bw");
    need(f.avx512vl, "avx512vl");
    need(f.avx512dq, "avx512dq");
  }
  if (isa == CpuIsa::Avx512Vnni) need(f.avx512_vnni, "avx512_vnni");
  if (missing.empty()) return "";
  return std::string("this CPU lacks ") + missing + " (has: " + cpu_features() + ") for the " + cpu_isa_name(isa) +
         " path";
}

CpuIsa active_cpu_isa() {
  const Choice& c = choice();
  if (!c.error.empty()) throw std::runtime_error(c.error);
  return static_cast<CpuIsa>(c.isa.load(std::memory_order_relaxed));
}

void set_cpu_isa(CpuIsa isa) {
  const std::string why = cpu_isa_unsupported_reason(isa);
  if (!why.empty()) throw std::invalid_argument("set_cpu_isa: " + why);
  Choice& c = choice();
  c.error.clear();
  c.isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

std::string cpu_features() {
  const Features& f = features();
  std::string s;
  auto add = [&](bool have, const char* what) {
    if (have) s += std::string(s.empty() ? "" : " ") + what;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512dq, "avx512dq");
  add(f.avx512_vnni, "avx512_vnni");
  add(f.avx512_bf16, "avx512_bf16");
  return s.empty() ? "none of avx2 / avx512" : s;
}

namespace cpu {
const Kernels& kernels() { return *table(active_cpu_isa()); }

const QuantizeLoops& quantize_loops() {
  switch (active_cpu_isa()) {
#ifdef KVPREC_HAVE_AVX2
    case CpuIsa::Avx2: return *avx2_quantize_loops();
#endif
#ifdef KVPREC_HAVE_AVX512
    case CpuIsa::Avx512:
    case CpuIsa::Avx512Vnni: return *avx512_quantize_loops();
#endif
    default: return *scalar_quantize_loops();
  }
}
}  // namespace cpu

}  // namespace kvprec
