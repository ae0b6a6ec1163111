#pragma once
// What every conformance kit of adalora/testing/ returns: the outcome of each check, in a fixed
// order, with the queries a unit test makes of them and a summary it prints on failure.

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "adalora/config.hpp"

namespace adalora::testing {

enum class check_status : std::uint8_t { passed, failed, skipped };

inline const char* to_string(check_status s) noexcept {
  switch (s) {
    case check_status::passed:
      return "passed";
    case check_status::failed:
      return "FAILED";
    default:
      return "skipped";
  }
}

/// The outcome of one check. `message` says what was checked, or the first offending value with
/// its inputs, or why the check was skipped.
struct check_result {
  std::string name;
  check_status status = check_status::passed;
  std::string message;

  bool passed() const noexcept { return status == check_status::passed; }
  bool failed() const noexcept { return status == check_status::failed; }
  bool skipped() const noexcept { return status == check_status::skipped; }
};

/// The checks of one kit run. Each kit's report derives from it and adds what it checked
/// (`title()` and `subject()` head the summary).
struct check_report {
  std::vector<check_result> checks;

  /// True iff no check failed. Skipped checks do not fail a report.
  bool ok() const noexcept {
    return std::none_of(checks.begin(), checks.end(),
                        [](const check_result& c) { return c.failed(); });
  }
  /// The check of that name, or nullptr.
  const check_result* find(std::string_view name) const noexcept {
    for (const check_result& c : checks)
      if (c.name == name) return &c;
    return nullptr;
  }
  /// The check of that name; throws std::out_of_range for an unknown name.
  const check_result& at(std::string_view name) const {
    if (const check_result* c = find(name)) return *c;
    throw std::out_of_range(::adalora::detail::concat("adalora::testing::check_report::at: no check named '",
                                                      name, "'"));
  }
  /// Names of the failed checks, in report order.
  std::vector<std::string> failed() const {
    std::vector<std::string> names;
    for (const check_result& c : checks)
      if (c.failed()) names.push_back(c.name);
    return names;
  }

 protected:
  /// "<title> (<subject>): ok|FAILED", then one line per check.
  std::string summary_of(std::string_view title, std::string_view subject) const {
    std::ostringstream out;
    out << title << " (" << subject << "): " << (ok() ? "ok" : "FAILED") << '\n';
    for (const check_result& c : checks)
      out << "  [" << to_string(c.status) << "] " << c.name << ": " << c.message << '\n';
    return out.str();
  }
};

}  // namespace adalora::testing
