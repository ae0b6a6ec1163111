// The in-process communicator (adalora/testing/in_process_communicator.hpp) and the communicator
// conformance kit (adalora/testing/communicator_conformance.hpp): the shipped communicator passes
// the kit for 1 to 5 participants and fails loudly instead of hanging; communicators broken in
// one way each fail exactly the check meant to catch that, with a message that says what is
// wrong.

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/communicator.hpp"
#include "adalora/testing/communicator_conformance.hpp"
#include "adalora/testing/in_process_communicator.hpp"

namespace {

using adalora::testing::check_communicator_conformance;
using adalora::testing::communicator_conformance_options;
using adalora::testing::communicator_report;
using adalora::testing::in_process_communicator;
using adalora::testing::in_process_group;
namespace checks = adalora::testing::communicator_checks;

/// Small calls keep the broken communicators' runs short; the defaults run in the test of the
/// shipped communicator.
const communicator_conformance_options quick{
    .values = 64, .large_values = 5000, .repeated_calls = 12};

/// How a test communicator goes wrong.
enum class fault {
  none,               // sums in rank order, like in_process_communicator
  forget_last,        // leaves the last participant out
  via_float,          // sums in float (a "compressed" transport)
  own_first,          // each participant starts from its own value: orders differ
  reverse_odd_calls,  // rank order on even calls, reverse rank order on odd ones
  first_size_only,    // sums only as many values as the first call had
  write_past_end,     // writes one value past the span
  throw_on_empty,     // refuses an empty span
};

/// Participants that see each other's buffers through shared memory (a barrier between phases),
/// so that each computes its own result: the way a buggy hand-written all-reduce goes wrong.
struct gather_hub {
  explicit gather_hub(int participants)
      : n(participants), views(static_cast<std::size_t>(participants)), sync(participants) {}
  int n;
  std::vector<std::span<double>> views;
  std::barrier<> sync;
};

struct gather_comm {
  gather_hub* hub;
  int rank;
  fault bug = fault::none;
  int call = 0;
  std::size_t first_size = 0;

  void all_reduce_sum(std::span<double> v) {
    if (bug == fault::throw_on_empty && v.empty())
      throw std::invalid_argument("gather_comm: nothing to reduce");
    if (call == 0) first_size = v.size();
    hub->views[static_cast<std::size_t>(rank)] = v;
    hub->sync.arrive_and_wait();  // every buffer is published
    std::vector<double> out(v.begin(), v.end());
    for (std::size_t i = 0; i < v.size(); ++i)
      if (bug != fault::first_size_only || i < first_size) out[i] = sum(i);
    hub->sync.arrive_and_wait();  // nobody reads the buffers any more
    std::copy(out.begin(), out.end(), v.begin());
    if (bug == fault::write_past_end && !v.empty()) v.data()[v.size()] = 0.0;
    ++call;
  }

  double value(int p, std::size_t i) const { return hub->views[static_cast<std::size_t>(p)][i]; }
  double sum(std::size_t i) const {
    const int n = hub->n;
    switch (bug) {
      case fault::forget_last: {
        double s = value(0, i);
        for (int p = 1; p < n - 1; ++p) s += value(p, i);
        return n > 1 ? s : value(0, i);
      }
      case fault::via_float: {
        float s = static_cast<float>(value(0, i));
        for (int p = 1; p < n; ++p) s += static_cast<float>(value(p, i));
        return s;
      }
      case fault::own_first: {
        double s = value(rank, i);
        for (int p = 0; p < n; ++p)
          if (p != rank) s += value(p, i);
        return s;
      }
      case fault::reverse_odd_calls:
        if (call % 2 == 1) {
          double s = value(n - 1, i);
          for (int p = n - 2; p >= 0; --p) s += value(p, i);
          return s;
        }
        [[fallthrough]];
      default: {
        double s = value(0, i);
        for (int p = 1; p < n; ++p) s += value(p, i);
        return s;
      }
    }
  }
};
static_assert(adalora::check_communicator<gather_comm>());

// Which types are communicators (compile-time; tests/compile_fail/communicator_*.cpp show the
// messages).
struct const_comm {  // a const member is fine: the allocator calls it on its own copy
  void all_reduce_sum(std::span<double>) const {}
};
struct float_comm {
  void all_reduce_sum(std::span<float>) {}
};
struct status_comm {
  int all_reduce_sum(std::span<double>) { return 0; }
};
struct pinned_comm {
  pinned_comm() = default;
  pinned_comm(pinned_comm&&) = delete;
  void all_reduce_sum(std::span<double>) {}
};
static_assert(adalora::Communicator<const_comm>);
static_assert(adalora::Communicator<adalora::single_process>);
static_assert(adalora::Communicator<in_process_communicator>);
static_assert(!adalora::Communicator<float_comm>);
static_assert(!adalora::Communicator<status_comm>);
static_assert(!adalora::Communicator<pinned_comm>);
static_assert(!adalora::Communicator<int>);

communicator_report check_gather(int n, fault bug) {
  gather_hub hub(n);
  std::vector<gather_comm> comms;
  for (int p = 0; p < n; ++p) comms.push_back({&hub, p, bug});
  return check_communicator_conformance(comms, quick);
}

/// The report's failed checks, for a compact assertion.
std::vector<std::string> failed(const communicator_report& r) { return r.failed(); }
using names = std::vector<std::string>;

}  // namespace

TEST_CASE("in_process_communicator passes the communicator kit", "[communicator][kit]") {
  for (int n : {1, 2, 3, 5}) {
    in_process_group group(n);
    auto comms = group.communicators();
    const communicator_report report = check_communicator_conformance(comms);
    INFO(report);
    REQUIRE(report.ok());
    REQUIRE(report.participants == n);
    REQUIRE(report.checks.size() == 7);
    for (const auto& c : report.checks) REQUIRE(c.passed());
    // Every participant made every call of the script, so the group counted each once.
    REQUIRE(group.calls() > 24);
  }
}

TEST_CASE("a correct hand-written all-reduce passes too", "[communicator][kit]") {
  const communicator_report report = check_gather(4, fault::none);
  INFO(report);
  REQUIRE(report.ok());
}

TEST_CASE("in_process_communicator sums in rank order, the same bits everywhere",
          "[communicator]") {
  // ((1 + 1e16) - 1e16) is 0 in double (1 + 1e16 rounds to 1e16); any other order gives 1 or 2.
  in_process_group group(3);
  const double inputs[3] = {1.0, 1e16, -1e16};
  std::vector<double> results(3, -1.0);
  for (int repeat = 0; repeat < 20; ++repeat) {
    group.run([&](in_process_communicator comm) {
      double v = inputs[comm.rank()];
      comm.all_reduce_sum(std::span<double>(&v, 1));
      results[static_cast<std::size_t>(comm.rank())] = v;
    });
    REQUIRE(results == std::vector<double>{0.0, 0.0, 0.0});
  }
  REQUIRE(group.calls() == 20);
}

TEST_CASE("a group of one leaves the values as they are, -0.0 included", "[communicator]") {
  in_process_group group(1);
  auto comm = group.communicator(0);
  std::vector<double> v = {-0.0, 1.5, 0x1p-1074};
  comm.all_reduce_sum(v);
  REQUIRE(std::signbit(v[0]));
  REQUIRE(v[1] == 1.5);
  REQUIRE(v[2] == 0x1p-1074);
  REQUIRE(comm.size() == 1);
  REQUIRE(comm.rank() == 0);
}

TEST_CASE("an in-process group fails loudly instead of hanging", "[communicator][errors]") {
  SECTION("a participant throws: run() rethrows it, the others stop waiting") {
    in_process_group group(3);
    std::atomic<int> woken{0};
    REQUIRE_THROWS_WITH(group.run([&](in_process_communicator comm) {
      if (comm.rank() == 1) throw std::logic_error("participant 1's bug");
      std::vector<double> v(4, 1.0);
      try {
        comm.all_reduce_sum(v);
      } catch (const std::runtime_error& ex) {
        if (std::string(ex.what()).find("the group failed: participant 1 threw") !=
            std::string::npos)
          ++woken;
        throw;
      }
    }),
                        "participant 1's bug");
    REQUIRE(woken == 2);
    // The group stays failed.
    std::vector<double> v(1, 1.0);
    REQUIRE_THROWS_WITH(group.communicator(0).all_reduce_sum(v),
                        Catch::Contains("participant 0 of 3: the group failed"));
  }
  SECTION("a participant returns while the others wait") {
    in_process_group group(3);
    REQUIRE_THROWS_WITH(group.run([&](in_process_communicator comm) {
      if (comm.rank() == 2) return;  // skips the collective
      std::vector<double> v(4, 1.0);
      comm.all_reduce_sum(v);
    }),
                        // Which of 0 and 1 already wait when 2 returns depends on timing.
                        Catch::Contains("the group failed: participant 2 returned while "
                                        "participant(s) ") &&
                            Catch::Contains("wait in all_reduce_sum (call 0): every participant "
                                            "must make the same calls"));
  }
  SECTION("participants pass buffers of different lengths") {
    in_process_group group(2);
    REQUIRE_THROWS_WITH(
        group.run([&](in_process_communicator comm) {
          std::vector<double> v(comm.rank() == 0 ? 5 : 3, 1.0);
          comm.all_reduce_sum(v);
        }),
        Catch::Contains("participant 1 passed 3 values but participant 0 passed 5") &&
            Catch::Contains("every participant must pass the same number"));
  }
  SECTION("bad arguments") {
    REQUIRE_THROWS_WITH(in_process_group(0), Catch::Contains("participants must be >= 1, got 0"));
    in_process_group group(2);
    REQUIRE_THROWS_WITH(group.communicator(2), Catch::Contains("rank must be in [0, 2), got 2"));
  }
}

TEST_CASE("the kit names a participant left out of the sum", "[communicator][kit]") {
  const communicator_report report = check_gather(4, fault::forget_last);
  INFO(report);
  REQUIRE(failed(report) == names{"true_sum", "owner_zeros", "empty_spans", "repeated_calls"});
  REQUIRE_THAT(report.at(checks::true_sum).message,
               Catch::Contains("the sum without participant(s) 3: their values were left out") &&
                   Catch::Contains("on 4 of 4 participant(s)"));
  REQUIRE_THAT(report.at(checks::owner_zeros).message,
               Catch::Contains("participant 3 contributed"));
}

TEST_CASE("the kit catches a communicator that rounds", "[communicator][kit]") {
  // Exact inputs are small integers times powers of two: float carries them, so only the
  // owner_zeros check (1/3, subnormals, the largest double) sees the rounding.
  const communicator_report report = check_gather(3, fault::via_float);
  INFO(report);
  REQUIRE(failed(report) == names{"owner_zeros"});
  REQUIRE_THAT(report.at(checks::owner_zeros).message,
               Catch::Contains("got 0.3333333432674408") &&
                   Catch::Contains("contributed 0.33333333333333331 and the others +0.0") &&
                   Catch::Contains("must leave a value bit-exact"));
}

TEST_CASE("the kit catches participants that add in different orders", "[communicator][kit]") {
  const communicator_report report = check_gather(3, fault::own_first);
  INFO(report);
  REQUIRE(failed(report) == names{"same_result"});
  REQUIRE_THAT(report.at(checks::same_result).message,
               Catch::Contains("but participant 0 got") &&
                   Catch::Contains("every participant must add in the same order"));
}

TEST_CASE("the kit catches an order that changes from call to call", "[communicator][kit]") {
  const communicator_report report = check_gather(3, fault::reverse_odd_calls);
  INFO(report);
  REQUIRE(failed(report) == names{"deterministic"});
  REQUIRE_THAT(
      report.at(checks::deterministic).message,
      Catch::Contains("were reduced again") && Catch::Contains("must not depend on timing"));
}

TEST_CASE("the kit catches state kept from the first call", "[communicator][kit]") {
  const communicator_report report = check_gather(2, fault::first_size_only);
  INFO(report);
  // The owner_zeros call is longer than the first call too.
  REQUIRE(failed(report) == names{"owner_zeros", "repeated_calls"});
  REQUIRE_THAT(report.at(checks::repeated_calls).message,
               Catch::Contains("for value 64 of call") && Catch::Contains("repeated_calls: "));
}

TEST_CASE("the kit catches a write past the span", "[communicator][kit]") {
  const communicator_report report = check_gather(2, fault::write_past_end);
  INFO(report);
  REQUIRE(failed(report) == names{"in_bounds"});
  REQUIRE_THAT(report.at(checks::in_bounds).message,
               Catch::Contains("wrote 0 outside the span, 1 value(s) after its last value"));
}

TEST_CASE("a communicator that throws fails its check; later ones are skipped",
          "[communicator][kit]") {
  const communicator_report report = check_gather(2, fault::throw_on_empty);
  INFO(report);
  REQUIRE(failed(report) == names{"empty_spans"});
  REQUIRE_THAT(report.at(checks::empty_spans).message,
               Catch::Contains("threw in call 3 (empty_spans: 0 values, an empty span, "
                               "data() == nullptr): gather_comm: nothing to reduce"));
  REQUIRE(report.at(checks::repeated_calls).skipped());
  REQUIRE(report.at(checks::deterministic).skipped());
  REQUIRE(report.at(checks::true_sum).passed());
}

TEST_CASE("the kit validates its arguments", "[communicator][kit][errors]") {
  std::vector<adalora::single_process> none;
  REQUIRE_THROWS_WITH(check_communicator_conformance(none),
                      Catch::Contains("between 1 and 30 communicators, got 0"));
  std::vector<adalora::single_process> one(1);
  REQUIRE_THROWS_WITH(check_communicator_conformance(one, {.values = 0}),
                      Catch::Contains("options.values must be >= 1, got 0"));
  const communicator_report report = check_communicator_conformance(one);
  REQUIRE(report.ok());  // one participant: a no-op is the sum
  REQUIRE_THROWS_WITH(report.at("no_such_check"),
                      Catch::Contains("no check named 'no_such_check'"));
}
