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
// Requirements, for a communicator type C:
//  1. `void all_reduce_sum(std::span<double> values)`, callable on a (non-const) C: replaces each
//     value by its sum over all processes, with the same bits on every process. The allocator
//     calls it at every mask event, from one thread, with the same number of values on every
//     process.
//  2. It returns void: a failure is an exception (or an abort), never a status the allocator
//     would have to look at.
//  3. C is move-constructible: the allocator keeps its own C (a handle to the real channel).
// Behaviour that matters beyond the signature: adding exact zeros must leave a value bit-exact.
// Each partial sum comes from one process and the others add +0.0, so any summation order then
// gives the single-process value (x + 0.0 is x bit for bit for every x but -0.0, which turns
// into +0.0 and ranks the same).
// adalora/testing/communicator_conformance.hpp checks this and the rest in one process, with
// threads as participants (docs/communicators.md).

#include <concepts>
#include <span>
#include <type_traits>

namespace adalora {

namespace detail {
template <class C>
concept has_all_reduce_sum = requires(C& c, std::span<double> values) { c.all_reduce_sum(values); };
template <class C>
concept all_reduce_sum_returns_void =
    !has_all_reduce_sum<C> || requires(C& c, std::span<double> values) {
      { c.all_reduce_sum(values) } -> std::same_as<void>;
    };
}  // namespace detail

/// C sums the allocator's partial sums across processes; see the requirements above.
template <class C>
concept Communicator = detail::has_all_reduce_sum<C> && detail::all_reduce_sum_returns_void<C> &&
                       std::move_constructible<C>;

/// Names every requirement a communicator type misses, at compile time, one static_assert each.
/// Call it where a communicator is first used (the rank allocator and the testing kit do).
template <class C>
consteval bool check_communicator() {
  static_assert(detail::has_all_reduce_sum<C>,
                "adalora: a communicator needs the member function `void all_reduce_sum("
                "std::span<double> values)`, callable on a non-const communicator, that replaces "
                "each value by its sum over all processes");
  static_assert(detail::all_reduce_sum_returns_void<C>,
                "adalora: a communicator's all_reduce_sum must return void: the rank allocator "
                "ignores a returned value, so report a failure by throwing");
  static_assert(std::move_constructible<C>,
                "adalora: a communicator must be move-constructible: the rank allocator keeps "
                "its own (pass a handle to the channel, not the channel itself)");
  return true;
}

/// One process holds every adapter completely (also data-parallel training, where gradients are
/// already all-reduced so every replica computes the same scores): nothing to exchange.
struct single_process {
  void all_reduce_sum(std::span<double>) noexcept {}
};
static_assert(check_communicator<single_process>());

}  // namespace adalora
