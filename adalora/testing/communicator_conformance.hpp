#pragma once
// A conformance kit for communicators (communicator.hpp): test your own all-reduce in one
// process, with threads as participants, before any MPI job depends on it.
//
//     std::vector<my_communicator> comms = connect_my_communicators(4);  // 4 participants
//     auto report = adalora::testing::check_communicator_conformance(comms);
//     INFO(report);            // Catch2; or std::cerr << report with any framework
//     REQUIRE(report.ok());
//
// comms[p] is participant p's communicator; the kit runs each participant on a thread of its
// own, which makes the same sequence of all_reduce_sum calls as every other (a collective
// script) on deterministic inputs, and only ever calls its own communicator. The checks (names
// in `communicator_checks::`):
//   same_result     every participant gets the same bits, on inputs whose rounded sum depends
//                   on the summation order;
//   true_sum        on exact inputs (sums exact in any order) every participant gets the exact
//                   sum; a participant whose values were left out or counted twice is named;
//   owner_zeros     each value comes from one participant and the others add +0.0: every
//                   participant gets that value bit for bit (1/3, subnormals, the largest
//                   double, +inf, ...). The sharded rank allocator relies on exactly this to
//                   match one process (communicator.hpp); a communicator that rounds (through
//                   float, a compressed format, a scaled integer) fails it;
//   empty_spans     all_reduce_sum on an empty span (with and without a data pointer) returns,
//                   and the next call is right;
//   repeated_calls  calls in a row with sizes from 1 to large_values (by default more than the
//                   allocator's buffer at the LLaMA-7B shape) are all right: no state leaks
//                   from one call into the next;
//   deterministic   the same inputs reduced again give the same bits as the first time;
//   in_bounds       nothing outside the span is written (checked around every call).
// A communicator that throws fails the check whose call threw; checks after it are "skipped".
// A communicator that deadlocks cannot be reported: after options.timeout_seconds the kit
// prints which participant waits in which call to stderr and calls std::abort(), so that the
// test fails with a diagnosis instead of hanging.

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <ostream>
#include <ranges>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include "adalora/communicator.hpp"
#include "adalora/config.hpp"
#include "adalora/testing/conformance.hpp"

namespace adalora::testing {

/// The names of the communicator kit's checks, in the order they appear in a report.
namespace communicator_checks {
inline constexpr std::string_view same_result = "same_result";
inline constexpr std::string_view true_sum = "true_sum";
inline constexpr std::string_view owner_zeros = "owner_zeros";
inline constexpr std::string_view empty_spans = "empty_spans";
inline constexpr std::string_view repeated_calls = "repeated_calls";
inline constexpr std::string_view deterministic = "deterministic";
inline constexpr std::string_view in_bounds = "in_bounds";
}  // namespace communicator_checks

/// Options of check_communicator_conformance.
struct communicator_conformance_options {
  std::uint64_t seed = 0xc011'ec71'7e5eULL;  ///< seeds every input; same seed, same inputs
  std::size_t values = 1024;                 ///< values per call of the main checks, >= 1
  /// The largest call of repeated_calls (the allocator passes b0 + Σ r·(⌈in/256⌉ + ⌈out/256⌉)
  /// values: 79 872 at the LLaMA-7B shape), >= 1.
  std::size_t large_values = std::size_t{1} << 17;
  int repeated_calls = 24;  ///< calls in a row in repeated_calls, >= 1
  /// Seconds the whole script may take before the kit reports a deadlock and aborts (0: wait
  /// forever).
  int timeout_seconds = 120;
};

/// What check_communicator_conformance found: one entry per check, in a fixed order.
struct communicator_report : check_report {
  int participants = 0;

  /// One line per check, then a verdict: what a test prints on failure.
  std::string summary() const {
    return summary_of("communicator conformance", ::adalora::detail::concat(participants, " participants"));
  }
  friend std::ostream& operator<<(std::ostream& os, const communicator_report& r) {
    return os << r.summary();
  }
};

namespace detail {

/// What a call's inputs are made of.
enum class comm_input : std::uint8_t {
  exact,  // ±m·2^(p-10), m < 2^20: every summation order gives the exact sum
  owner,  // one participant (i mod N) holds a value, the others +0.0
  mixed,  // full-mantissa values of many magnitudes: the rounded sum depends on the order
  empty,  // no values
};

/// One collective call of the script; every participant makes the same calls in this order.
struct comm_call {
  std::string_view check;  // the check it belongs to
  comm_input input;
  std::size_t size;
  std::uint64_t key;  // with the seed, determines the inputs
  bool null_data;     // an empty span with data() == nullptr
};

inline constexpr std::size_t comm_guard = 4;      // cells either side of every buffer
inline constexpr int comm_max_participants = 30;  // exact sums need m·(2^N - 1) < 2^53

/// The guard value, compared bitwise: no all-reduce computes it by accident.
inline double comm_guard_value() noexcept { return -0x1.5a5a5a5a5a5a5p+300; }

/// Values every communicator must carry bit-exactly when the others add +0.0.
inline double owner_special(std::size_t j) noexcept {
  constexpr double specials[] = {
      1.0 / 3.0,
      0x0.0000000000001p-1022,                  // the smallest subnormal
      0x1.fffffffffffffp+1023,                  // the largest double
      std::numeric_limits<double>::infinity(),  // a score beyond double's range
      0x1.0000000000001p+0,                     // 1 + 2^-52
      -0x1.fffffffffffffp+1023,
      0x1p-1022,  // the smallest normal
      3.141592653589793,
      0.1,
      1e-300,
  };
  return specials[j % std::size(specials)];
}
inline constexpr std::size_t owner_special_count = 10;

/// Participant p's input value i of `call` among n participants.
inline double comm_input_value(const comm_call& call, std::uint64_t seed, int p, int n,
                               std::size_t i) noexcept {
  const std::uint64_t h = splitmix64(splitmix64(seed ^ call.key) ^ static_cast<std::uint64_t>(i));
  switch (call.input) {
    case comm_input::exact: {
      const double m = static_cast<double>(1 + (h >> 44));  // [1, 2^20]
      return std::ldexp((h & 1) != 0 ? -m : m, p - 10);
    }
    case comm_input::owner: {
      if (static_cast<int>(i % static_cast<std::size_t>(n)) != p) return 0.0;
      if (i < owner_special_count * static_cast<std::size_t>(n))
        return owner_special(i / static_cast<std::size_t>(n));
      const double u = static_cast<double>(h >> 11) * 0x1.0p-53 + 0.5;  // [0.5, 1): 53 bits
      return std::ldexp((h & 1) != 0 ? -u : u, static_cast<int>((h >> 1) % 2000) - 1000);
    }
    case comm_input::mixed: {
      const std::uint64_t hp = splitmix64(h ^ static_cast<std::uint64_t>(p + 1));
      const double u = static_cast<double>(hp >> 11) * 0x1.0p-53 + 0.5;
      return std::ldexp((hp & 1) != 0 ? -u : u, static_cast<int>((hp >> 1) % 41) - 20);
    }
    default:
      return 0.0;
  }
}

/// The exact sum of an exact call's value i over n participants.
inline double comm_exact_sum(const comm_call& call, std::uint64_t seed, int n,
                             std::size_t i) noexcept {
  const double v0 = comm_input_value(call, seed, 0, n, i);  // ±m·2^-10
  return v0 * static_cast<double>((std::uint64_t{1} << n) - 1);
}

/// Why `got` is not the exact sum `want` of value i: names the participants whose values are
/// missing or counted twice when the bits say so (participant p contributes v0·2^p).
inline std::string comm_exact_diagnosis(double got, double v0, int n) {
  using ::adalora::detail::concat;
  const double k = got / v0;  // bit p set: participant p's value arrived
  const std::uint64_t all = (std::uint64_t{1} << n) - 1;
  if (!(std::isfinite(k) && k >= 0 && k < std::ldexp(1.0, n + 1) && k == std::floor(k)))
    return "not a sum of the participants' values: rounded or corrupted";
  const auto arrived = static_cast<std::uint64_t>(k);
  if (arrived == 2 * all) return "twice the sum: every value counted twice";
  if (arrived > all && std::has_single_bit(arrived - all) &&
      arrived - all < (std::uint64_t{1} << n))
    return concat("participant ", std::countr_zero(arrived - all), "'s value counted twice");
  if (arrived > all) return "more than the sum: values counted more than once";
  std::string missing;
  for (int p = 0; p < n; ++p)
    if ((arrived >> p & 1) == 0) missing += concat(missing.empty() ? "" : ", ", p);
  return concat("the sum without participant(s) ", missing, ": their values were left out");
}

/// What one participant saw: per check, its first problem and how many values were wrong.
struct comm_participant_log {
  struct entry {
    std::string first;
    std::size_t bad = 0;
  };
  std::vector<entry> by_check;                     // indexed like comm_check_names
  std::vector<std::vector<double>> mixed_results;  // the mixed calls' results, in script order
  std::string error;                               // what a call threw
  std::size_t error_call = 0;
  std::atomic<std::size_t> at_call{0};  // the call in progress (for a deadlock report)
  std::atomic<bool> done{false};
};

inline constexpr std::string_view comm_check_names[] = {
    communicator_checks::same_result,    communicator_checks::true_sum,
    communicator_checks::owner_zeros,    communicator_checks::empty_spans,
    communicator_checks::repeated_calls, communicator_checks::deterministic,
    communicator_checks::in_bounds};

inline std::size_t comm_check_index(std::string_view name) noexcept {
  for (std::size_t c = 0; c < std::size(comm_check_names); ++c)
    if (comm_check_names[c] == name) return c;
  return 0;
}

/// The script every participant runs.
inline std::vector<comm_call> comm_script(const communicator_conformance_options& o) {
  namespace cc = communicator_checks;
  std::vector<comm_call> s;
  s.push_back({cc::same_result, comm_input::mixed, o.values, 1, false});
  s.push_back({cc::true_sum, comm_input::exact, o.values, 2, false});
  s.push_back({cc::owner_zeros, comm_input::owner,
               std::max(o.values, 2 * owner_special_count * comm_max_participants), 3, false});
  s.push_back({cc::empty_spans, comm_input::empty, 0, 4, true});
  s.push_back({cc::empty_spans, comm_input::empty, 0, 5, false});
  s.push_back({cc::empty_spans, comm_input::exact, 3, 6, false});
  const std::size_t sizes[] = {1, 2, 3, 17, 255, 256, 257, 1000, 4097, o.large_values};
  for (int c = 0; c < o.repeated_calls; ++c) {
    // The sizes go up and down, so that a communicator that keeps the first call's size, or a
    // buffer sized by an earlier call, shows up.
    const std::size_t size = sizes[static_cast<std::size_t>(c * 7) % std::size(sizes)];
    s.push_back({cc::repeated_calls, comm_input::exact, std::min(size, o.large_values),
                 100 + static_cast<std::uint64_t>(c), false});
  }
  s.push_back({cc::deterministic, comm_input::mixed, o.values, 1, false});
  s.push_back({cc::deterministic, comm_input::mixed, o.values, 1, false});
  return s;
}

inline const char* comm_input_name(comm_input k) noexcept {
  switch (k) {
    case comm_input::exact:
      return "exact inputs";
    case comm_input::owner:
      return "one owner per value, +0.0 from the others";
    case comm_input::mixed:
      return "full-mantissa inputs";
    default:
      return "an empty span";
  }
}

inline std::string comm_describe_call(const std::vector<comm_call>& script, std::size_t c) {
  const comm_call& call = script[c];
  return ::adalora::detail::concat("call ", c, " (", call.check, ": ", call.size, " values, ",
                                   comm_input_name(call.input),
                                   call.null_data ? ", data() == nullptr" : "", ")");
}

/// Participant p's part of the script on its own communicator `comm`.
template <class C>
void comm_run_participant(C& comm, int p, int n, const std::vector<comm_call>& script,
                          const communicator_conformance_options& o, comm_participant_log& log) {
  log.by_check.resize(std::size(comm_check_names));
  std::vector<double> buffer;
  auto note = [&](std::string_view check, auto&& describe) {
    comm_participant_log::entry& e = log.by_check[comm_check_index(check)];
    if (e.bad++ == 0) e.first = describe();
  };
  for (std::size_t c = 0; c < script.size(); ++c) {
    const comm_call& call = script[c];
    log.at_call.store(c);
    buffer.assign(call.size + 2 * comm_guard, comm_guard_value());
    double* const values = buffer.data() + comm_guard;
    for (std::size_t i = 0; i < call.size; ++i) values[i] = comm_input_value(call, o.seed, p, n, i);
    try {
      comm.all_reduce_sum(call.null_data ? std::span<double>()
                                         : std::span<double>(values, call.size));
    } catch (const std::exception& ex) {
      log.error = ::adalora::detail::concat("participant ", p, " threw in ",
                                            comm_describe_call(script, c), ": ", ex.what());
      log.error_call = c;
      return;
    } catch (...) {
      log.error = ::adalora::detail::concat(
          "participant ", p, " threw a non-standard exception in ", comm_describe_call(script, c));
      log.error_call = c;
      return;
    }
    const double guard = comm_guard_value();
    for (std::size_t g = 0; g < buffer.size(); ++g) {
      if (g >= comm_guard && g < comm_guard + call.size) continue;
      if (std::memcmp(&buffer[g], &guard, sizeof(double)) == 0) continue;
      note(communicator_checks::in_bounds, [&] {
        const bool before = g < comm_guard;
        return ::adalora::detail::concat(
            "participant ", p, " in ", comm_describe_call(script, c), " wrote ", num(buffer[g]),
            " outside the span, ", before ? comm_guard - g : g - comm_guard - call.size + 1,
            before ? " value(s) before its first value" : " value(s) after its last value");
      });
      break;
    }
    for (std::size_t i = 0; i < call.size; ++i) {
      const double got = values[i];
      if (call.input == comm_input::exact) {
        const double want = comm_exact_sum(call, o.seed, n, i);
        if (same_value(got, want)) continue;
        note(call.check, [&] {
          return ::adalora::detail::concat(
              "participant ", p, " got ", num(got), " for value ", i, " of ",
              comm_describe_call(script, c), " where the exact sum is ", num(want), ": ",
              comm_exact_diagnosis(got, comm_input_value(call, o.seed, 0, n, i), n));
        });
      } else if (call.input == comm_input::owner) {
        const int owner = static_cast<int>(i % static_cast<std::size_t>(n));
        const double want = comm_input_value(call, o.seed, owner, n, i);
        if (std::memcmp(&got, &want, sizeof(double)) == 0) continue;
        note(call.check, [&] {
          return ::adalora::detail::concat(
              "participant ", p, " got ", num(got), " for value ", i, " of ",
              comm_describe_call(script, c), " where participant ", owner, " contributed ",
              num(want),
              " and the others +0.0: adding exact zeros must leave a value bit-exact "
              "(the sharded rank allocator relies on it to match one process)");
        });
      }
    }
    if (call.input == comm_input::mixed) log.mixed_results.emplace_back(values, values + call.size);
  }
}

/// The first value where two results differ, or nullopt.
inline std::optional<std::size_t> comm_first_difference(const std::vector<double>& a,
                                                        const std::vector<double>& b) {
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(double)) != 0) return i;
  if (a.size() != b.size()) return std::min(a.size(), b.size());
  return std::nullopt;
}

/// Waits for every participant or, after the timeout, reports who waits where and aborts.
inline void comm_wait_or_abort(std::vector<comm_participant_log>& logs, std::mutex& m,
                               std::condition_variable& cv, const std::vector<comm_call>& script,
                               int timeout_seconds) {
  std::unique_lock<std::mutex> lock(m);
  auto all_done = [&] {
    return std::all_of(logs.begin(), logs.end(),
                       [](const comm_participant_log& l) { return l.done.load(); });
  };
  if (timeout_seconds <= 0) {
    cv.wait(lock, all_done);
    return;
  }
  if (cv.wait_for(lock, std::chrono::seconds(timeout_seconds), all_done)) return;
  std::string who;
  for (std::size_t p = 0; p < logs.size(); ++p) {
    who += ::adalora::detail::concat("\n  participant ", p, ": ");
    who += logs[p].done.load()
               ? (logs[p].error.empty() ? std::string("finished the script")
                                        : "stopped: " + logs[p].error)
               : "still in all_reduce_sum, " + comm_describe_call(script, logs[p].at_call.load());
  }
  std::fprintf(stderr,
               "adalora::testing::check_communicator_conformance: the participants have not "
               "finished after %d s: the communicator deadlocks (a participant waits for a call "
               "the others do not make, or for one that threw). Aborting, as the waiting threads "
               "cannot be stopped.%s\n",
               timeout_seconds, who.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace detail

/// Runs the communicator checks (see the header comment) with participants[p] as participant p
/// and returns the report. Compile-time requirements come first, from check_communicator<C>().
/// Throws std::invalid_argument for bad options or a participant count outside [1, 30] (the
/// exact inputs give participant p the weight 2^p); std::system_error if a thread cannot start.
template <std::ranges::random_access_range R>
communicator_report check_communicator_conformance(
    R&& participants, const communicator_conformance_options& options = {}) {
  static_assert(std::ranges::sized_range<R>,
                "adalora::testing::check_communicator_conformance: pass the participants' "
                "communicators as a sized range (a vector, an array or a span of them)");
  using C = std::ranges::range_value_t<R>;
  static_assert(check_communicator<C>());
  static_assert(std::is_lvalue_reference_v<std::ranges::range_reference_t<R>>,
                "adalora::testing::check_communicator_conformance: pass the participants' "
                "communicators themselves (a vector, an array or a span of them)");
  namespace d = detail;
  constexpr const char* where = "testing::check_communicator_conformance";
  const auto n = static_cast<int>(std::ranges::size(participants));
  ADALORA_REQUIRE(n >= 1 && n <= d::comm_max_participants, where,
                  "participants must hold between 1 and ", d::comm_max_participants,
                  " communicators, got ", std::ranges::size(participants));
  ADALORA_REQUIRE(options.values >= 1, where, "options.values must be >= 1, got ", options.values);
  ADALORA_REQUIRE(options.large_values >= 1, where, "options.large_values must be >= 1, got ",
                  options.large_values);
  ADALORA_REQUIRE(options.repeated_calls >= 1, where, "options.repeated_calls must be >= 1, got ",
                  options.repeated_calls);

  const std::vector<d::comm_call> script = d::comm_script(options);
  std::vector<d::comm_participant_log> logs(static_cast<std::size_t>(n));
  std::mutex m;
  std::condition_variable cv;
  bool go = false, cancelled = false;  // every thread starts only once all could be created
  std::vector<std::thread> threads;
  threads.reserve(logs.size());
  auto body = [&](int p) {
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return go || cancelled; });
      if (cancelled) return;
    }
    auto it = std::ranges::begin(participants);
    std::ranges::advance(it, p);
    d::comm_run_participant(*it, p, n, script, options, logs[static_cast<std::size_t>(p)]);
    {
      const std::lock_guard<std::mutex> lock(m);
      logs[static_cast<std::size_t>(p)].done.store(true);
    }
    cv.notify_all();
  };
  try {
    for (int p = 0; p < n; ++p) threads.emplace_back(body, p);
  } catch (...) {
    {
      const std::lock_guard<std::mutex> lock(m);
      cancelled = true;
    }
    cv.notify_all();
    for (std::thread& t : threads) t.join();
    throw;
  }
  {
    const std::lock_guard<std::mutex> lock(m);
    go = true;
  }
  cv.notify_all();
  d::comm_wait_or_abort(logs, m, cv, script, options.timeout_seconds);
  for (std::thread& t : threads) t.join();

  communicator_report report;
  report.participants = n;
  // The first call that threw, on any participant: its check fails, later checks are skipped.
  std::size_t stop = script.size();
  std::string stop_error;
  for (const d::comm_participant_log& l : logs)
    if (!l.error.empty() && l.error_call < stop) stop = l.error_call, stop_error = l.error;
  auto first_call_of = [&](std::string_view check) {
    for (std::size_t c = 0; c < script.size(); ++c)
      if (script[c].check == check) return c;
    return script.size();
  };
  auto last_call_of = [&](std::string_view check) {
    std::size_t last = 0;
    for (std::size_t c = 0; c < script.size(); ++c)
      if (script[c].check == check) last = c;
    return last;
  };
  const std::string stop_check = stop < script.size() ? std::string(script[stop].check) : "";
  // Failures every participant logged on its own, merged: the first participant's, and a count.
  auto merged = [&](std::string_view check, const std::string& passed) -> check_result {
    const std::size_t k = d::comm_check_index(check);
    std::size_t bad = 0, participants_bad = 0;
    std::string first;
    for (const d::comm_participant_log& l : logs) {
      if (l.by_check.size() <= k || l.by_check[k].bad == 0) continue;
      if (participants_bad++ == 0) first = l.by_check[k].first;
      bad += l.by_check[k].bad;
    }
    if (bad == 0) return {std::string(check), check_status::passed, passed};
    return {std::string(check), check_status::failed,
            ::adalora::detail::concat(bad, " wrong value(s) on ", participants_bad, " of ", n,
                                      " participant(s); first: ", first)};
  };
  auto result_of = [&](std::string_view check, auto&& evaluate) -> check_result {
    if (stop < first_call_of(check) && check != communicator_checks::in_bounds)
      return {std::string(check), check_status::skipped,
              ::adalora::detail::concat("not run: ", stop_check, " threw first (see ", stop_check,
                                        ")")};
    if (stop <= last_call_of(check) && check != communicator_checks::in_bounds)
      return {std::string(check), check_status::failed, stop_error};
    return evaluate();
  };
  const std::size_t mixed_calls = 3;  // same_result's call and deterministic's two repeats
  auto& c = report.checks;
  c.push_back(result_of(communicator_checks::same_result, [&]() -> check_result {
    for (int p = 1; p < n; ++p) {
      const auto& mine = logs[static_cast<std::size_t>(p)].mixed_results[0];
      const auto& first = logs[0].mixed_results[0];
      if (auto i = d::comm_first_difference(first, mine))
        return {std::string(communicator_checks::same_result), check_status::failed,
                ::adalora::detail::concat(
                    "participant ", p, " got ", d::num(mine[*i]), " for value ", *i, " of ",
                    d::comm_describe_call(script, 0), " but participant 0 got ", d::num(first[*i]),
                    ": every participant must add in the same order (or one participant sums "
                    "and sends the result to all), else their masks can differ")};
    }
    return {std::string(communicator_checks::same_result), check_status::passed,
            ::adalora::detail::concat(n, " participants got the same bits for ", options.values,
                                      " values whose rounded sum depends on the order")};
  }));
  c.push_back(result_of(communicator_checks::true_sum, [&] {
    return merged(communicator_checks::true_sum,
                  ::adalora::detail::concat("the exact sum of ", n, " participants' values, for ",
                                            options.values, " values, on every participant"));
  }));
  c.push_back(result_of(communicator_checks::owner_zeros, [&] {
    return merged(communicator_checks::owner_zeros,
                  ::adalora::detail::concat(
                      script[2].size,
                      " values held by one participant each (1/3, subnormals, +-max, +inf, "
                      "...) came back bit-exact on every participant"));
  }));
  c.push_back(result_of(communicator_checks::empty_spans, [&] {
    return merged(communicator_checks::empty_spans,
                  "empty spans (data() null and not) returned, and the next call was exact");
  }));
  c.push_back(result_of(communicator_checks::repeated_calls, [&] {
    return merged(communicator_checks::repeated_calls,
                  ::adalora::detail::concat(options.repeated_calls, " calls in a row, sizes 1 to ",
                                            options.large_values, ", exact on every participant"));
  }));
  c.push_back(result_of(communicator_checks::deterministic, [&]() -> check_result {
    for (int p = 0; p < n; ++p) {
      const auto& results = logs[static_cast<std::size_t>(p)].mixed_results;
      for (std::size_t r = 1; r < mixed_calls; ++r)
        if (auto i = d::comm_first_difference(results[0], results[r]))
          return {
              std::string(communicator_checks::deterministic), check_status::failed,
              ::adalora::detail::concat(
                  "participant ", p, " got ", d::num(results[r][*i]), " for value ", *i,
                  " when the inputs of ", d::comm_describe_call(script, 0), " were reduced again (",
                  d::comm_describe_call(script, script.size() - mixed_calls + r), "), but ",
                  d::num(results[0][*i]),
                  " the first time: the summation order must "
                  "not depend on timing")};
    }
    return {std::string(communicator_checks::deterministic), check_status::passed,
            ::adalora::detail::concat("the same ", options.values,
                                      " full-mantissa inputs reduced 3 times gave the same bits")};
  }));
  c.push_back(merged(communicator_checks::in_bounds,
                     ::adalora::detail::concat("no write outside the span in ",
                                               stop < script.size() ? stop : script.size(),
                                               " calls on each participant")));
  return report;
}

}  // namespace adalora::testing
