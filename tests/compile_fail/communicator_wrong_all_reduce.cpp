// A communicator that all-reduces a std::vector instead of a std::span<double> (the allocator's
// buffer is not a vector): requirement 1 is named with its signature.
// expect-error: adalora: a communicator needs the member function `void all_reduce_sum(std::span<double> values)`
#include <vector>

#include "adalora/rank_allocator.hpp"

struct vector_comm {
  void all_reduce_sum(std::vector<double>&) {}
};

int main() {
  adalora::rank_allocator<float, adalora::smoothed_sensitivity, adalora::cubic_schedule,
                          vector_comm>
      alloc(std::vector<adalora::adapter_shape>{{"q", 4, 4, 8}},
            adalora::cubic_schedule({.target_budget = 4, .total_step = 20}));
  return static_cast<int>(alloc.initial_budget());
}
