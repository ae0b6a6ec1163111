// A schedule whose at(t) returns a bare budget instead of adalora::budget_decision (it forgot the
// mask flag): the allocator names requirement 1 with its signature.
// expect-error: adalora: a budget schedule needs the member function `adalora::budget_decision at(std::int64_t t) const`
#include <cstdint>
#include <vector>

#include "adalora/rank_allocator.hpp"

struct budget_only_schedule {
  std::int64_t at(std::int64_t t) const { return t < 10 ? 8 : 4; }
  std::int64_t initial_budget() const { return 8; }
  std::int64_t target_budget() const { return 4; }
  std::int64_t final_phase_start() const { return 10; }
};

int main() {
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, budget_only_schedule> alloc(
      std::vector<adalora::adapter_shape>{{"q", 4, 4, 8}}, budget_only_schedule{});
  return static_cast<int>(alloc.initial_budget());
}
