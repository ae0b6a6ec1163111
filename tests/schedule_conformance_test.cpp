// The budget schedule conformance kit (adalora/testing/schedule_conformance.hpp): the built-in
// schedules pass it, with their initial budget given or left to the adapters; schedules broken
// in one way each fail exactly the check meant to catch that, with a message that says what is
// wrong and where.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/budget_schedule.hpp"
#include "adalora/testing/schedule_conformance.hpp"

namespace {

using adalora::budget_decision;
using adalora::testing::check_schedule_conformance;
using adalora::testing::schedule_conformance_options;
using adalora::testing::schedule_report;
using std::int64_t;
namespace checks = adalora::testing::schedule_checks;
using names = std::vector<std::string>;

/// How a test schedule goes wrong.
enum class fault {
  none,
  above_initial,      // budget b0 + 1 at step 6
  negative,           // budget -1 at step 7
  stateful_mask,      // masks 2 steps after the last mask it was asked about
  final_every_other,  // masks every other step in the final phase
  misses_target,      // bT + 1 at final_phase_start()
  warm_up_prunes,     // b0 - 1 at step 3, inside the warm-up
  grows,              // the budget goes up at step 12
  throws,             // at(9) throws
  hook_ignores_b0,    // with_initial_budget returns the schedule unchanged
  hook_moves_target,  // with_initial_budget also changes the target
};

/// A user schedule: b0 through the warm-up [0, 4], a linear fall to bT at step 20 with a mask
/// every other step, then {bT, mask} every step. Optional hook included.
struct step_schedule {
  int64_t b0 = 30, bt = 10;
  fault bug = fault::none;
  mutable int64_t last_mask = -100;  // only fault::stateful_mask uses it

  static constexpr int64_t warm = 4, final_start = 20;

  budget_decision at(int64_t t) const {
    if (bug == fault::throws && t == 9)
      throw std::domain_error("step_schedule: no budget for step 9");
    if (t <= warm) return {bug == fault::warm_up_prunes && t == 3 ? b0 - 1 : b0, false};
    if (t > final_start) return {bt, bug == fault::final_every_other ? t % 2 == 0 : true};
    int64_t budget = b0 - (t - warm) * (b0 - bt) / (final_start - warm);
    if (bug == fault::above_initial && t == 6) budget = b0 + 1;
    if (bug == fault::negative && t == 7) budget = -1;
    if (bug == fault::misses_target && t == final_start) budget = bt + 1;
    if (bug == fault::grows && t == 12) budget = std::min(b0, budget + 3);
    bool mask = t % 2 == 0;
    if (bug == fault::stateful_mask) {
      mask = t - last_mask >= 2;
      if (mask) last_mask = t;
    }
    return {budget, mask};
  }
  int64_t initial_budget() const { return b0; }
  int64_t target_budget() const { return bt; }
  int64_t final_phase_start() const { return final_start; }
  step_schedule with_initial_budget(int64_t b) const {
    step_schedule s = *this;
    if (bug != fault::hook_ignores_b0) s.b0 = b;
    if (bug == fault::hook_moves_target) s.bt = b / 3;
    return s;
  }
};
static_assert(adalora::check_budget_schedule<step_schedule>());

/// The same schedule without the optional hook.
struct hookless_schedule {
  step_schedule s;
  budget_decision at(int64_t t) const { return s.at(t); }
  int64_t initial_budget() const { return s.b0; }
  int64_t target_budget() const { return s.bt; }
  int64_t final_phase_start() const { return s.final_start; }
};
static_assert(adalora::check_budget_schedule<hookless_schedule>());

// Which types are schedules (compile-time; tests/compile_fail/schedule_*.cpp show the
// messages). The optional hook counts only when right, and a wrong one is refused, not ignored.
#define BUDGET_ACCESSORS                                             \
  int64_t initial_budget() const { return 8; }                       \
  int64_t target_budget() const { return 2; }                        \
  int64_t final_phase_start() const { return 10; }
struct no_hook {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
};
struct final_with_hook final {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
  final_with_hook with_initial_budget(int64_t) const { return {}; }
};
struct hook_not_const {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
  hook_not_const with_initial_budget(int64_t) { return {}; }
};
struct hook_returns_other {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
  no_hook with_initial_budget(int64_t) const { return {}; }
};
struct final_hook_returns_void final {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
  void with_initial_budget(int64_t) const {}
};
struct hook_is_data {
  budget_decision at(int64_t) const { return {8, false}; }
  BUDGET_ACCESSORS
  int64_t with_initial_budget = 0;
};
struct hook_not_assignable {
  const int64_t b0 = 8;
  budget_decision at(int64_t) const { return {b0, false}; }
  BUDGET_ACCESSORS
  hook_not_assignable with_initial_budget(int64_t) const { return {}; }
};
struct at_not_const {
  budget_decision at(int64_t) { return {8, false}; }
  BUDGET_ACCESSORS
};
#undef BUDGET_ACCESSORS
static_assert(adalora::BudgetSchedule<no_hook>);
static_assert(adalora::BudgetSchedule<final_with_hook>);
static_assert(!adalora::BudgetSchedule<hook_not_const>);
static_assert(!adalora::BudgetSchedule<hook_returns_other>);
static_assert(!adalora::BudgetSchedule<final_hook_returns_void>);
static_assert(!adalora::BudgetSchedule<hook_is_data>);
static_assert(!adalora::BudgetSchedule<hook_not_assignable>);
static_assert(!adalora::BudgetSchedule<at_not_const>);
static_assert(!adalora::BudgetSchedule<int>);
static_assert(adalora::BudgetSchedule<adalora::cubic_schedule>);

const schedule_conformance_options with_warm_up{.warm_up_end = step_schedule::warm};

schedule_report check(fault bug, schedule_conformance_options o = with_warm_up) {
  return check_schedule_conformance(step_schedule{.bug = bug}, o);
}

}  // namespace

TEMPLATE_TEST_CASE("the built-in schedules pass the schedule kit", "[schedule][kit]",
                   adalora::cubic_schedule, adalora::linear_schedule, adalora::constant_schedule) {
  const schedule_conformance_options declared{.warm_up_end = 10, .non_increasing = true};
  SECTION("initial budget given") {
    const TestType s({.initial_budget = 40,
                      .target_budget = 20,
                      .total_step = 60,
                      .tinit = 10,
                      .tfinal = 10,
                      .delta_t = 5});
    const schedule_report report = check_schedule_conformance(s, declared);
    INFO(report);
    REQUIRE(report.ok());
    for (const auto& c : report.checks) REQUIRE(c.passed());
    REQUIRE_THAT(report.at(checks::allocator).message,
                 Catch::Contains("ranks 20 + 20 followed 83 steps"));
    REQUIRE_THAT(report.schedule,
                 Catch::Equals("b0 = 40, bT = 20, final phase from step 50, steps 0 to 82"));
  }
  SECTION("initial budget left to the adapters") {
    const TestType s(
        {.target_budget = 3, .total_step = 30, .tinit = 10, .tfinal = 5, .delta_t = 3});
    const schedule_report report = check_schedule_conformance(s, declared);
    INFO(report);
    REQUIRE(report.ok());
    REQUIRE_THAT(report.schedule,
                 Catch::StartsWith("b0 = 48 (budget_from_adapters, set by the kit)"));
    REQUIRE_THAT(report.at(checks::allocator).message, Catch::Contains("b0 filled in from them"));
  }
  SECTION("a long run is sampled, not skipped") {
    const TestType s({.initial_budget = 400,
                      .target_budget = 100,
                      .total_step = 3'000'000,
                      .tinit = 1000,
                      .tfinal = 1000,
                      .delta_t = 100});
    const schedule_report report = check_schedule_conformance(s, {.non_increasing = true});
    INFO(report);
    REQUIRE(report.ok());
    REQUIRE_THAT(report.at(checks::budget_range).message, Catch::Contains("all 299966 budgets"));
  }
}

TEST_CASE("a correct user schedule passes, with and without the hook", "[schedule][kit]") {
  const schedule_report with_hook = check(fault::none, {.warm_up_end = 4, .non_increasing = true});
  INFO(with_hook);
  REQUIRE(with_hook.ok());
  REQUIRE(with_hook.at(checks::with_initial_budget).passed());
  const schedule_report without = check_schedule_conformance(hookless_schedule{}, with_warm_up);
  INFO(without);
  REQUIRE(without.ok());
  REQUIRE(without.at(checks::with_initial_budget).skipped());
  REQUIRE(without.at(checks::non_increasing).skipped());
  REQUIRE(without.at(checks::allocator).passed());
}

TEST_CASE("budget_range catches budgets above the initial budget or below 0", "[schedule][kit]") {
  const schedule_report above = check(fault::above_initial);
  INFO(above);
  REQUIRE(above.failed() == names{"budget_range"});
  REQUIRE_THAT(above.at(checks::budget_range).message,
               Catch::Contains("at(6) returned {budget 31, mask}, above initial_budget() = 30"));
  REQUIRE(above.at(checks::with_initial_budget).skipped());
  REQUIRE(above.at(checks::allocator).skipped());

  const schedule_report negative = check(fault::negative);
  INFO(negative);
  REQUIRE(negative.failed() == names{"budget_range"});
  REQUIRE_THAT(negative.at(checks::budget_range).message,
               Catch::Contains("at(7) returned {budget -1, no mask}: a budget must be >= 0"));
}

TEST_CASE("budget_range catches a schedule that throws, and later checks are skipped",
          "[schedule][kit]") {
  const schedule_report report = check(fault::throws);
  INFO(report);
  REQUIRE(report.failed() == names{"budget_range"});
  REQUIRE(report.at(checks::budget_range).message ==
          "at(9) threw: step_schedule: no budget for step 9");
  for (auto name : {checks::determinism, checks::final_phase, checks::warm_up,
                    checks::with_initial_budget, checks::allocator})
    REQUIRE_THAT(report.at(name).message, Catch::Contains("not run: at(9) threw"));
}

TEST_CASE("budget_range catches budget_from_adapters without the hook", "[schedule][kit]") {
  const schedule_report report =
      check_schedule_conformance(hookless_schedule{{.b0 = adalora::budget_from_adapters}});
  INFO(report);
  REQUIRE(report.failed() == names{"budget_range"});
  REQUIRE_THAT(report.at(checks::budget_range).message,
               Catch::Contains("initial_budget() must be >= 1, got -1 (budget_from_adapters: the "
                               "schedule has no with_initial_budget to set it)"));
}

TEST_CASE("determinism catches a schedule that remembers earlier calls", "[schedule][kit]") {
  const schedule_report report = check(fault::stateful_mask);
  INFO(report);
  REQUIRE(report.failed() == names{"determinism"});
  REQUIRE_THAT(report.at(checks::determinism).message,
               Catch::Contains("when called in order from step 0, but") &&
                   Catch::Contains("at(t) must depend on t alone"));
}

TEST_CASE("final_phase catches a target missed or a final phase that skips masks",
          "[schedule][kit]") {
  const schedule_report missed = check(fault::misses_target);
  INFO(missed);
  REQUIRE(missed.failed() == names{"final_phase"});
  REQUIRE_THAT(missed.at(checks::final_phase).message,
               Catch::Contains("at(final_phase_start() = 20) returned {budget 11, mask}: the "
                               "budget must reach target_budget() = 10 there"));

  const schedule_report skips = check(fault::final_every_other);
  INFO(skips);
  REQUIRE(skips.failed() == names{"final_phase"});
  REQUIRE_THAT(skips.at(checks::final_phase).message,
               Catch::Contains("at(21) returned {budget 10, no mask} in the final phase"));
}

TEST_CASE("warm_up catches pruning inside the declared warm-up, only when declared",
          "[schedule][kit]") {
  const schedule_report report = check(fault::warm_up_prunes);
  INFO(report);
  REQUIRE(report.failed() == names{"warm_up"});
  REQUIRE_THAT(report.at(checks::warm_up).message,
               Catch::Contains("at(3) returned {budget 29, no mask} in the declared warm-up "
                               "[0, 4]: expected {budget 30 (initial_budget()), no mask}"));
  const schedule_report undeclared = check(fault::warm_up_prunes, {});
  REQUIRE(undeclared.ok());
  REQUIRE(undeclared.at(checks::warm_up).skipped());
}

TEST_CASE("non_increasing catches a budget that grows, only when asked", "[schedule][kit]") {
  const schedule_report report = check(fault::grows, {.non_increasing = true});
  INFO(report);
  REQUIRE(report.failed() == names{"non_increasing"});
  REQUIRE_THAT(report.at(checks::non_increasing).message,
               Catch::Contains("the budget grows from 22 at step 11 to 23 at step 12"));
  REQUIRE(check(fault::grows, {}).ok());
}

TEST_CASE("with_initial_budget catches a hook that ignores b0 or moves the target",
          "[schedule][kit]") {
  const schedule_report ignores = check(fault::hook_ignores_b0);
  INFO(ignores);
  REQUIRE(ignores.failed() == names{"with_initial_budget"});
  REQUIRE_THAT(ignores.at(checks::with_initial_budget).message,
               Catch::Contains("with_initial_budget(11).initial_budget() is 30, expected 11"));
  REQUIRE(ignores.at(checks::allocator).skipped());

  const schedule_report moves = check(fault::hook_moves_target);
  INFO(moves);
  REQUIRE(moves.failed() == names{"with_initial_budget"});
  REQUIRE_THAT(moves.at(checks::with_initial_budget).message,
               Catch::Contains("with_initial_budget(11) changed target_budget() from 10 to 3"));
}

TEST_CASE("the schedule kit validates its options and names its checks",
          "[schedule][kit][errors]") {
  REQUIRE_THROWS_WITH(check(fault::none, {.last_step = -2}),
                      Catch::Contains("options.last_step must be >= 0 (or -1), got -2"));
  REQUIRE_THROWS_WITH(check(fault::none, {.adapters_budget = 0}),
                      Catch::Contains("options.adapters_budget must be >= 1, got 0"));
  const schedule_report report = check(fault::none);
  REQUIRE(report.checks.size() == 7);
  REQUIRE_THROWS_WITH(report.at("nope"), Catch::Contains("no check named 'nope'"));
  REQUIRE_THAT(report.summary(), Catch::StartsWith("budget schedule conformance (b0 = 30, bT = 10, "
                                                   "final phase from step 20, steps 0 to 52): ok"));
  // A last step before the final phase leaves it unchecked, and says so.
  const schedule_report short_run = check(fault::none, {.last_step = 15});
  REQUIRE(short_run.at(checks::final_phase).skipped());
  REQUIRE_THAT(short_run.at(checks::final_phase).message,
               Catch::Contains("options.last_step = 15 ends before the final phase"));
}
