// A communicator that holds its channel (here a std::mutex) by value cannot be moved into the
// allocator: requirement 3 says to pass a handle instead.
// expect-error: adalora: a communicator must be move-constructible
#include <mutex>
#include <span>

#include "adalora/communicator.hpp"

struct owning_comm {
  std::mutex channel;
  void all_reduce_sum(std::span<double>) { const std::lock_guard<std::mutex> lock(channel); }
};

static_assert(adalora::check_communicator<owning_comm>());

int main() { return 0; }
