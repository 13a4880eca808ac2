// The torch-free parts of kvprec (formats.h, the precision mapper) report bad input as std::invalid_argument;
// everything that faces torch reports it as c10::ValueError, which Python sees as ValueError. value_errors(fn)
// runs fn and translates the first into the second, keeping the message (which names the argument).
#pragma once

#include <c10/util/Exception.h>

#include <stdexcept>

namespace kvprec {

template <typename Fn>
auto value_errors(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  throw std::logic_error("unreachable");
}

}  // namespace kvprec
