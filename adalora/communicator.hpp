#pragma once
// The Communicator concept: where the rank allocator's step meets other processes.
//
// AdaLoRA's mask is a global decision over every triplet of every adapter, so processes that
// each hold part of the adapters (or part of each adapter) must agree on the triplet scores
// before they select the threshold. The allocator's step is split at exactly that point: each
// process accumulates its partial sums (three numbers per triplet: the E score, the sum of its
// A row's scores, the sum of its B column's scores), the communicator sums them across
// processes, and every process then derives the same scores, threshold and masks. Parameters
// and importance state never travel.
//
// Requirement: `void all_reduce_sum(std::span<double> values)` replaces each value by its sum
// over all processes, with the same result on every process.

#include <concepts>
#include <span>

namespace adalora {

template <class C>
concept Communicator = requires(C& c, std::span<double> values) { c.all_reduce_sum(values); };

/// One process holds every adapter completely (also data-parallel training, where gradients are
/// already all-reduced so every replica computes the same scores): nothing to exchange.
struct single_process {
  void all_reduce_sum(std::span<double>) noexcept {}
};

}  // namespace adalora
