// A schedule with int budgets, no target_budget() and a non-const final_phase_start(): each of
// requirements 2 to 4 is named with its signature, and at(t), which is right, is not.
// expect-error: adalora: a budget schedule needs the member function `std::int64_t initial_budget() const`
// expect-error: adalora: a budget schedule needs the member function `std::int64_t target_budget() const`
// expect-error: adalora: a budget schedule needs the member function `std::int64_t final_phase_start() const`
#include <cstdint>

#include "adalora/budget_schedule.hpp"

struct sloppy_schedule {
  adalora::budget_decision at(std::int64_t t) const { return {t < 10 ? 8 : 4, t >= 10}; }
  int initial_budget() const { return 8; }
  std::int64_t final_phase_start() { return 10; }
};

static_assert(adalora::check_budget_schedule<sloppy_schedule>());

int main() { return 0; }
