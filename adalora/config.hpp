#pragma once
// Version and the error-reporting macros shared by every adalora header.

#include <sstream>
#include <stdexcept>
#include <string>

#define ADALORA_VERSION_MAJOR 0
#define ADALORA_VERSION_MINOR 1
#define ADALORA_VERSION_PATCH 0

namespace adalora {

/// Every error adalora reports is (or derives from) std::invalid_argument or std::runtime_error,
/// and its message names the function, the argument, what was expected and what was given.
namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace adalora

/// Throws std::invalid_argument("adalora::<where>: <message parts...>") when `cond` is false.
#define ADALORA_REQUIRE(cond, where, ...)                                                     \
  do {                                                                                        \
    if (!(cond)) throw std::invalid_argument(::adalora::detail::concat("adalora::", where, ": ", \
                                                                       __VA_ARGS__));         \
  } while (false)
