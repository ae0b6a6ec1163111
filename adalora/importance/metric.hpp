#pragma once
// The ImportanceMetric concept: how an element of lora_A, lora_E or lora_B is scored.
//
// A metric is a small policy object holding its hyperparameters. It sees one element at a time:
// the parameter value after the optimizer step, its gradient, and `state_size` values of
// per-element state that the rank allocator owns (zero-initialised, reset to zero when PEFT's
// semantics call reset_ipt). Because it sees values, not tensors, a metric cannot modify the
// user's parameters or gradients, cannot allocate per element, and is vectorised and fused by
// the allocator into a single pass over memory (importance update + triplet sums), which is
// what makes the step run at memory bandwidth.
//
// Requirements, for a metric type M and element type T (float or double):
//  1. `static constexpr std::size_t state_size`: number of state values per element (may be 0).
//  2. `S update(tensor_role role, T param, T grad, std::span<T, M::state_size> state) const`:
//     advances the state with this step's (param, grad) and returns the element's score.
//  3. `S score(tensor_role role, T param, std::span<const T, M::state_size> state) const`:
//     the element's score from the state alone (used when scores are frozen, in the final
//     phase, where no gradient enters). Must equal what the last update() returned when the
//     parameter has not changed since.
// S is a floating-point type: T, or double where a product of T values could overflow T (the
// allocator ranks in double). Scores must be finite and >= 0; the triplet score combines them
// (see rank_allocator.hpp). The allocator only calls update() with finite param and grad.
// Optional: `void begin_step(std::int64_t step)` is called once before each update pass.
// Optional: `static constexpr bool scores_may_overflow = true` declares that a score may exceed
// double's range for finite input and state (a product of two large state values, as Ī·Ū in
// double): its +inf then stands for such a score and ranks above every finite one, as torch
// ranks it. Without it, +inf breaks the contract like NaN does.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

namespace adalora {

/// Which tensor of an SVD adapter an element belongs to.
enum class tensor_role : std::uint8_t {
  A,  ///< lora_A, r × in (right singular vectors)
  E,  ///< lora_E, r (singular values)
  B,  ///< lora_B, out × r (left singular vectors)
};

namespace detail {
template <class M>
concept has_state_size = requires {
  { M::state_size } -> std::convertible_to<std::size_t>;
};
template <class M, class T>
concept has_update = has_state_size<M> &&
                     requires(const M& m, tensor_role role, T p, T g, std::span<T, M::state_size> s) {
                       { m.update(role, p, g, s) } -> std::floating_point;
                     };
template <class M, class T>
concept has_score = has_state_size<M> && requires(const M& m, tensor_role role, T p,
                                                  std::span<const T, M::state_size> s) {
  { m.score(role, p, s) } -> std::floating_point;
};
template <class M>
concept has_begin_step = requires(M& m, std::int64_t t) { m.begin_step(t); };
template <class M>
concept declares_overflow = requires {
  { M::scores_may_overflow } -> std::convertible_to<bool>;
};
/// True iff M declares scores_may_overflow = true (see the requirements above).
template <class M>
inline constexpr bool scores_may_overflow = [] {
  if constexpr (declares_overflow<M>)
    return static_cast<bool>(M::scores_may_overflow);
  else
    return false;
}();
}  // namespace detail

/// M scores elements of type T; see the requirements at the top of this header.
template <class M, class T>
concept ImportanceMetric =
    detail::has_state_size<M> && detail::has_update<M, T> && detail::has_score<M, T>;

/// Names the first requirement a metric type misses, at compile time. Call it where a metric is
/// first used (the rank allocator and the testing kit do).
template <class M, class T>
consteval bool check_importance_metric() {
  static_assert(detail::has_state_size<M>,
                "adalora: an importance metric needs `static constexpr std::size_t state_size` "
                "(the number of state values it keeps per element; 0 for none)");
  static_assert(detail::has_update<M, T>,
                "adalora: an importance metric needs the member function `S update("
                "adalora::tensor_role role, T param, T grad, std::span<T, state_size> state) "
                "const` returning the element's score (a floating-point S, e.g. T or double) "
                "after updating its state");
  static_assert(detail::has_score<M, T>,
                "adalora: an importance metric needs the member function `S score("
                "adalora::tensor_role role, T param, std::span<const T, state_size> state) "
                "const` returning the element's score (a floating-point S) from its state "
                "alone");
  return true;
}

}  // namespace adalora
