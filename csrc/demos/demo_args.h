// Command-line handling shared by the demos (a header: every csrc/demos/*.cpp is built as its own program).
//
// Contract of a demo's command line:
//   * each flag takes one value, checked in full against a stated range (no atoll-style "12abc" -> 12);
//   * a bad argument ends the program with ONE line on stderr that names the argument, the value and what is
//     accepted, exit code 2, before any work starts;
//   * --help / -h prints the usage (which states the same limits) on stdout, exit code 0;
//   * an error raised by the library while the demo runs is one line on stderr, exit code 1 -- never an
//     uncaught exception (which would abort with a backtrace, exit 134).
#pragma once

#include <c10/util/Exception.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvprec::demo {

// A bad command line: the message names the argument and what is accepted.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The shortest decimal text that reads back as x (so a limit printed in a message can be typed back in).
inline std::string format_real(double x) {
  for (int digits = 1; digits <= 17; ++digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*g", digits, x);
    if (std::strtod(buf, nullptr) == x) return buf;
  }
  return std::to_string(x);
}

// Flags of one demo, parsed from argv. Each add_* registers a flag with its accepted range and the variable
// that receives the value; `why` (optional) says where the range comes from and is printed with a refusal.
class Parser {
 public:
  explicit Parser(std::string usage) : usage_(std::move(usage)) {}

  void add_int(const char* flag, int64_t* out, int64_t lo, int64_t hi, std::string why = {}) {
    std::ostringstream accepted;
    accepted << "an integer in [" << lo << ", " << hi << "]";
    add(flag, accepted.str(), std::move(why), [=](const char* text) {
      errno = 0;
      char* end = nullptr;
      const long long x = std::strtoll(text, &end, 10);
      if (*text == '\0' || *end != '\0' || errno == ERANGE || x < lo || x > hi) return false;
      *out = x;
      return true;
    });
  }

  void add_real(const char* flag, double* out, double lo, double hi, std::string why = {}) {
    add(flag, "a number in [" + format_real(lo) + ", " + format_real(hi) + "]", std::move(why),
        [=](const char* text) {
          errno = 0;
          char* end = nullptr;
          const double x = std::strtod(text, &end);
          if (*text == '\0' || *end != '\0' || errno == ERANGE || !std::isfinite(x) || x < lo || x > hi) return false;
          *out = x;
          return true;
        });
  }

  // Parses argv[1..]. Returns false when --help / -h was given (the usage is printed on stdout); throws
  // UsageError for an unknown argument, a flag without a value, a flag given twice or a value out of range.
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
        std::fputs(usage_.c_str(), stdout);
        return false;
      }
    }
    std::vector<bool> seen(flags_.size(), false);
    for (int i = 1; i < argc; ++i) {
      size_t f = 0;
      while (f < flags_.size() && flags_[f].name != argv[i]) ++f;
      if (f == flags_.size())
        throw UsageError("unknown argument '" + std::string(argv[i]) + "'; accepted: " + names() + ", --help");
      const Flag& flag = flags_[f];
      if (seen[f]) throw UsageError(flag.name + " is given twice; give it once");
      seen[f] = true;
      if (i + 1 >= argc) throw UsageError(flag.name + " needs a value: " + flag.accepted + flag.why);
      const char* text = argv[++i];
      if (!flag.set(text))
        throw UsageError(flag.name + " " + text + " is not accepted; expected " + flag.accepted + flag.why);
    }
    return true;
  }

 private:
  struct Flag {
    std::string name, accepted, why;
    std::function<bool(const char*)> set;  // false: the text is not an accepted value
  };

  void add(const char* flag, std::string accepted, std::string why, std::function<bool(const char*)> set) {
    flags_.push_back({flag, std::move(accepted), why.empty() ? std::string() : " (" + why + ")", std::move(set)});
  }

  std::string names() const {
    std::string s;
    for (const Flag& f : flags_) s += (s.empty() ? "" : ", ") + f.name;
    return s;
  }

  std::string usage_;
  std::vector<Flag> flags_;
};

// One line: newlines of a multi-line library message become "; ".
inline std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (size_t p; (p = s.find('\n')) != std::string::npos;) s.replace(p, 1, "; ");
  return s;
}

// Runs a demo's main body: UsageError -> exit 2, any other exception -> exit 1, each as one line on stderr
// prefixed with the program name; otherwise the body's own exit code.
template <typename Body>
int guarded_main(const char* program, Body&& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", program, one_line(e.what()).c_str());
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, one_line(e.what_without_backtrace()).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, one_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace kvprec::demo
