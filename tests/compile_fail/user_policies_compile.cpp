// Control for the schedule and communicator snippets: a user schedule with the optional
// with_initial_budget hook and a user communicator, both right, compile in a rank_allocator (so
// the refusals next to this file are the checks at work, not a broken include path).
// expect: compiles
#include <cstdint>
#include <span>
#include <vector>

#include "adalora/rank_allocator.hpp"

struct step_down_schedule {
  std::int64_t b0 = adalora::budget_from_adapters;
  adalora::budget_decision at(std::int64_t t) const { return {t < 10 ? b0 : 4, t >= 10}; }
  std::int64_t initial_budget() const { return b0; }
  std::int64_t target_budget() const { return 4; }
  std::int64_t final_phase_start() const { return 10; }
  step_down_schedule with_initial_budget(std::int64_t b) const { return {b}; }
};
static_assert(adalora::BudgetSchedule<step_down_schedule>);

struct loopback_comm {
  void all_reduce_sum(std::span<double>) {}
};
static_assert(adalora::Communicator<loopback_comm>);

int main() {
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, step_down_schedule, loopback_comm>
      alloc(std::vector<adalora::adapter_shape>{{"q", 4, 4, 8}}, step_down_schedule{});
  return static_cast<int>(alloc.initial_budget()) - 8;
}
