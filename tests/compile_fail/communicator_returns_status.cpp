// A communicator that returns an error code (as MPI_Allreduce does) instead of throwing: the
// allocator would drop it, so requirement 2 refuses it.
// expect-error: adalora: a communicator's all_reduce_sum must return void
#include <span>

#include "adalora/communicator.hpp"

struct status_comm {
  int all_reduce_sum(std::span<double>) { return 0; }
};

static_assert(adalora::check_communicator<status_comm>());

int main() { return 0; }
