#pragma once
// A user-written Communicator for adalora's sharded rank allocator: a ring all-reduce between
// threads of one process over shared memory.
//
// This header is the part to adapt: your transport (sockets, a GPU collective library, shared
// memory between processes) goes where the shared buffers are, and the class keeps the
// Communicator's shape (adalora/communicator.hpp, docs/communicators.md). main.cpp runs sharded
// allocators on it; ring_communicator_test.cpp checks it with the communicator conformance kit.

#include <barrier>
#include <cstddef>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/communicator.hpp"
#include "adalora/sharding.hpp"

namespace example {

/// The shared part of a ring of n participants: where each one's buffer is, and a barrier that
/// separates the steps of the algorithm.
class ring {
 public:
  explicit ring(int participants)
      : n_(participants),
        data_(static_cast<std::size_t>(participants)),
        sizes_(static_cast<std::size_t>(participants)),
        step_(participants) {
    if (participants < 1)
      throw std::invalid_argument("example::ring: participants must be >= 1, got " +
                                  std::to_string(participants));
  }

  int size() const noexcept { return n_; }

 private:
  friend class ring_communicator;
  int n_;
  std::vector<double*> data_;
  std::vector<std::size_t> sizes_;
  std::barrier<> step_;
};

/// Participant `rank` of a ring: the ring all-reduce of NCCL and Horovod (Patarasuk and Yuan
/// 2009). The values are cut into n chunks; in n - 1 reduce-scatter steps each participant adds
/// its left neighbour's running sum of one chunk to its own, so that chunk c ends summed over all
/// participants, in the order c, c + 1, ..., c - 1; in n - 1 all-gather steps the finished chunks
/// travel round the ring. Each chunk is summed once and copied, so every participant gets the
/// same bits, and the order is fixed, so every run does. The order differs from chunk to chunk,
/// which the sharded allocator does not mind: each of its values comes from one participant and
/// the others add exact zeros.
class ring_communicator {
 public:
  ring_communicator(ring& r, int rank) : ring_(&r), rank_(rank) {
    if (rank < 0 || rank >= r.size())
      throw std::invalid_argument("example::ring_communicator: rank must be in [0, " +
                                  std::to_string(r.size()) + "), got " + std::to_string(rank));
  }

  void all_reduce_sum(std::span<double> values) {
    ring& r = *ring_;
    const int n = r.n_;
    if (n == 1) return;
    const auto me = static_cast<std::size_t>(rank_);
    r.data_[me] = values.data();
    r.sizes_[me] = values.size();
    r.step_.arrive_and_wait();  // every buffer is published
    for (std::size_t p = 0; p < r.sizes_.size(); ++p)
      if (r.sizes_[p] != values.size())  // every participant sees the same sizes: all throw
        throw std::invalid_argument("example::ring_communicator::all_reduce_sum: participant " +
                                    std::to_string(p) + " passed " + std::to_string(r.sizes_[p]) +
                                    " values, participant " + std::to_string(rank_) + " " +
                                    std::to_string(values.size()));
    const double* left = r.data_[static_cast<std::size_t>((rank_ + n - 1) % n)];
    const auto count = static_cast<adalora::index_t>(values.size());
    auto chunk = [&](int c) { return adalora::even_slice(count, (c % n + n) % n, n); };
    // At step s this participant writes chunk rank - s - 1 and reads the same chunk of its left
    // neighbour, who writes another one: no two threads touch the same value in a step.
    for (int s = 0; s < n - 1; ++s) {
      const adalora::index_slice c = chunk(rank_ - s - 1);
      for (adalora::index_t i = c.begin; i < c.begin + c.count; ++i)
        values[static_cast<std::size_t>(i)] = left[i] + values[static_cast<std::size_t>(i)];
      r.step_.arrive_and_wait();
    }
    for (int s = 0; s < n - 1; ++s) {
      const adalora::index_slice c = chunk(rank_ - s);
      for (adalora::index_t i = c.begin; i < c.begin + c.count; ++i)
        values[static_cast<std::size_t>(i)] = left[i];
      r.step_.arrive_and_wait();  // also: nobody reads this buffer once all have passed
    }
  }

  int rank() const noexcept { return rank_; }

 private:
  ring* ring_;  // a handle, so that the allocator can hold a copy
  int rank_;
};

// Checked where it is defined, so that a wrong signature fails here, naming the requirement.
static_assert(adalora::check_communicator<ring_communicator>());

}  // namespace example
