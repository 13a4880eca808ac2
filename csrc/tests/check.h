// Minimal test harness for the C++ tests (no framework to install): CHECK records a failure with its
// location and keeps going; a test's main returns kvprec_test::finish(), non-zero if any check failed.
#pragma once

// c10's glog-style logging defines CHECK too: include it first, then take the name for this harness, so the
// result does not depend on include order.
#include <c10/util/Logging.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>

namespace kvprec_test {

inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}

inline void record(bool ok, const char* expr, const char* file, int line, const std::string& detail = "") {
  ++checks();
  if (!ok) {
    ++failures();
    std::fprintf(stderr, "FAILED %s:%d: %s %s\n", file, line, expr, detail.c_str());
  }
}

// Runs fn and reports whether it threw an exception whose message contains `needle`.
inline bool throws_with(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const std::exception& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) return true;
    std::fprintf(stderr, "  threw, but the message lacks '%s': %s\n", needle.c_str(), e.what());
    return false;
  }
  std::fprintf(stderr, "  did not throw (expected '%s')\n", needle.c_str());
  return false;
}

inline int finish(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, checks(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace kvprec_test

#undef CHECK
#undef CHECK_NEAR
#undef CHECK_THROWS
#define CHECK(cond) ::kvprec_test::record(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
#define CHECK_NEAR(a, b, tol)                                                                                \
  ::kvprec_test::record(std::fabs(static_cast<double>(a) - static_cast<double>(b)) <= static_cast<double>(tol), \
                        #a " ~= " #b, __FILE__, __LINE__,                                                     \
                        "(" + std::to_string(static_cast<double>(a)) + " vs " + std::to_string(static_cast<double>(b)) + ")")
#define CHECK_THROWS(stmt, needle) \
  ::kvprec_test::record(::kvprec_test::throws_with([&] { stmt; }, needle), #stmt " throws " #needle, __FILE__, __LINE__)
