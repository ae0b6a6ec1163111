// A user schedule without adalora::checkpoint_traits: checkpointing an allocator that uses it
// must not compile, and the message must say what to provide.
// expect-error: the schedule type has no checkpoint_traits
// expect-error: static constexpr std::string_view tag
// expect-error: static YourSchedule decode(adalora::checkpoint_reader&)
#include "adalora/io/checkpoint.hpp"

struct my_schedule {
  adalora::budget_decision at(std::int64_t) const { return {2, true}; }
  std::int64_t initial_budget() const { return 2; }
  std::int64_t target_budget() const { return 1; }
  std::int64_t final_phase_start() const { return 100; }
};

int main() {
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, my_schedule> alloc({{"a", 3, 3, 2}},
                                                                                  my_schedule{});
  return static_cast<int>(adalora::checkpoint_bytes(alloc).size());
}
