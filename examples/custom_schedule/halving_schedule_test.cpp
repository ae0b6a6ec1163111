// Unit test of the custom schedule, with adalora's testing kit (//adalora:testing): what
// docs/budget_schedules.md asks of any schedule, plus the schedule's own formula.
//  1. compile time: it satisfies adalora::BudgetSchedule (check_budget_schedule names a missing
//     member);
//  2. behaviour: the schedule conformance kit (budgets in range, deterministic, final phase,
//     the declared warm-up, non-increasing, the with_initial_budget hook, a real allocator);
//  3. known values: the budgets of a small configuration.
//
//   bazel test //examples/custom_schedule:halving_schedule_test

#include <catch2/catch.hpp>

#include <cstdint>
#include <stdexcept>

#include "adalora/testing/schedule_conformance.hpp"
#include "examples/custom_schedule/halving_schedule.hpp"

namespace {

using example::halving_schedule;

static_assert(adalora::BudgetSchedule<halving_schedule>);

const halving_schedule::options small{.initial_budget = 12,
                                      .target_budget = 3,
                                      .total_step = 40,
                                      .tinit = 5,
                                      .tfinal = 10,
                                      .half_life = 5,
                                      .delta_t = 5};

}  // namespace

TEST_CASE("halving_schedule passes the schedule conformance kit", "[halving]") {
  // The warm-up and monotonicity are promises of this schedule, so the kit is asked to hold it
  // to them.
  for (halving_schedule::options o : {small, halving_schedule::options{.target_budget = 40,
                                             .total_step = 5000,
                                             .tinit = 100,
                                             .tfinal = 500,
                                             .half_life = 300,
                                             .delta_t = 10}}) {
    const auto report = adalora::testing::check_schedule_conformance(
        halving_schedule(o), {.warm_up_end = o.tinit, .non_increasing = true});
    INFO(report);
    REQUIRE(report.ok());
    REQUIRE(report.at("with_initial_budget").passed());
    REQUIRE(report.at("allocator").passed());
  }
}

TEST_CASE("halving_schedule: the prunable budget halves every half-life", "[halving]") {
  const halving_schedule s(small);
  // Excess b0 - bT = 9: 9, 4, 2, 1, 0 after 0 to 4 half-lives of 5 steps from tinit = 5.
  REQUIRE(s.at(5) == adalora::budget_decision{12, false});
  REQUIRE(s.at(9) == adalora::budget_decision{12, false});
  REQUIRE(s.at(10) == adalora::budget_decision{7, true});
  REQUIRE(s.at(15) == adalora::budget_decision{5, true});
  REQUIRE(s.at(16) == adalora::budget_decision{5, false});
  REQUIRE(s.at(20) == adalora::budget_decision{4, true});
  REQUIRE(s.at(25) == adalora::budget_decision{3, true});
  REQUIRE(s.at(30) == adalora::budget_decision{3, true});  // F = 40 - 10
  REQUIRE(s.at(31) == adalora::budget_decision{3, true});  // final phase: every step
  // A very long reduction phase cannot shift past the width of the budget.
  const halving_schedule long_run(
      {.initial_budget = 1000, .target_budget = 1, .total_step = 1'000'000, .half_life = 1});
  REQUIRE(long_run.at(500'000) == adalora::budget_decision{1, true});
}

TEST_CASE("halving_schedule: options are validated on construction", "[halving]") {
  halving_schedule::options o = small;
  o.half_life = 0;
  REQUIRE_THROWS_WITH(halving_schedule(o),
                      "adalora::example::halving_schedule: half_life must "
                      "be >= 1, got 0");
  o = small;
  o.initial_budget = 3;
  REQUIRE_THROWS_AS(halving_schedule(o), std::invalid_argument);
  REQUIRE_THROWS_AS(halving_schedule(small).with_initial_budget(2), std::invalid_argument);
}
