// A schedule whose optional with_initial_budget sets b0 in place (returns void) instead of
// returning the rebuilt schedule: the allocator would never call it and then refuse
// budget_from_adapters at run time, so it is a compile error naming the expected signature.
// expect-error: adalora: a budget schedule's optional with_initial_budget must be `S with_initial_budget(std::int64_t b0) const`
#include <cstdint>
#include <vector>

#include "adalora/rank_allocator.hpp"

struct in_place_schedule {
  std::int64_t b0 = adalora::budget_from_adapters;
  adalora::budget_decision at(std::int64_t t) const { return {t < 10 ? b0 : 4, t >= 10}; }
  std::int64_t initial_budget() const { return b0; }
  std::int64_t target_budget() const { return 4; }
  std::int64_t final_phase_start() const { return 10; }
  void with_initial_budget(std::int64_t b) { b0 = b; }
};

int main() {
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, in_place_schedule> alloc(
      std::vector<adalora::adapter_shape>{{"q", 4, 4, 8}}, in_place_schedule{});
  return static_cast<int>(alloc.initial_budget());
}
