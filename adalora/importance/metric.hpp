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
//
// Optional members (an update_block with another signature than 6's is refused at compile
// time, with a message from check_importance_metric, rather than silently not used):
//  4. `void begin_step(std::int64_t step)`: called once before each update pass.
//  5. `static constexpr bool scores_may_overflow = true`: a score may exceed double's range for
//     finite input and state (a product of two large state values, as Ī·Ū in double): its +inf
//     then stands for such a score and ranks above every finite one, as torch ranks it. Without
//     it, +inf breaks the contract like NaN does.
//  6. The block hook, the metric's own fast path:
//         void update_block(tensor_role role, std::span<const T, metric_block> params,
//                           std::span<const T, metric_block> grads,
//                           std::span<T, metric_block * M::state_size> state,
//                           std::span<double, metric_block> scores) const
//     update() of metric_block (8) contiguous elements of one tensor at once: element l has
//     param params[l], grad grads[l] and state values state[l·state_size, (l+1)·state_size),
//     and its score goes to scores[l]. It must leave the state and the scores exactly as update()
//     called on each element in turn would, scores[l] = static_cast<double>(update(...)), bit for
//     bit (the testing kit checks it). The allocator calls it in update passes, on contiguous
//     runs, with finite params and grads (a group with a NaN or infinity goes element by element
//     through update(); but see 7), and keeps for itself the NaN/infinity test, the validation
//     of the scores and their fixed-order sums (also the column sums of B, in vector registers
//     where r is a multiple of 4): results are the same with and without the hook. It inlines
//     the hook into its loop (GCC/Clang), so no attribute is needed.
//     When it pays: where the compiler vectorises update() poorly. A state_size of 2 or more
//     interleaves the state, which g++ handles with slow shuffles: explicit vector code (GCC/Clang
//     vector extensions, or intrinsics) then runs as fast as the built-in smoothed_sensitivity,
//     which uses this hook itself. It may be offered for some element types only
//     (smoothed_sensitivity's is for float); the others take the generic path.
//  7. `static constexpr bool update_block_keeps_non_finite_state = true`, with 6: update_block
//     may also be given NaN or infinite params and grads, and then leaves those elements' state
//     values exactly as they were (their scores may be anything). The allocator then tests the
//     values alongside the hook rather than before it (which saved ~5% of the step with
//     smoothed_sensitivity), and scores a run that had such a value again from the state with
//     score() (requirement 3): results do not change. Declare it only if the hook really keeps
//     that state (smoothed_sensitivity's guard against overflow does); the testing kit checks it.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace adalora {

/// Which tensor of an SVD adapter an element belongs to.
enum class tensor_role : std::uint8_t {
  A,  ///< lora_A, r × in (right singular vectors)
  E,  ///< lora_E, r (singular values)
  B,  ///< lora_B, out × r (left singular vectors)
};

/// Elements per call of a metric's optional update_block (see the requirements above): one lane
/// of the allocator's eight-lane sums per element.
inline constexpr std::size_t metric_block = 8;

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
/// M has the block hook for element type T, with the signature of the requirements above.
template <class M, class T>
concept has_update_block =
    has_state_size<M> &&
    requires(const M& m, tensor_role role, std::span<const T, metric_block> p,
             std::span<const T, metric_block> g, std::span<T, metric_block * M::state_size> s,
             std::span<double, metric_block> out) {
      { m.update_block(role, p, g, s, out) } -> std::same_as<void>;
    };
/// M declares a member named update_block, of any signature. Found by name: a class derived from
/// M and from one that declares update_block sees the name twice, and naming it is ambiguous (a
/// final class cannot be derived from, and is taken not to declare it).
struct declares_update_block_probe {
  void update_block();
};
template <class M>
struct update_block_lookup : M, declares_update_block_probe {};
template <class M>
concept declares_update_block = std::is_class_v<M> && !std::is_final_v<M> &&
                                !requires { &update_block_lookup<M>::update_block; };
template <class M>
concept declares_keeps_non_finite = requires {
  { M::update_block_keeps_non_finite_state } -> std::convertible_to<bool>;
};
/// True iff M declares update_block_keeps_non_finite_state = true (see the requirements above).
template <class M>
inline constexpr bool block_keeps_non_finite_state = [] {
  if constexpr (declares_keeps_non_finite<M>)
    return static_cast<bool>(M::update_block_keeps_non_finite_state);
  else
    return false;
}();
/// Either M has no member named update_block, or it is the hook for float or double.
template <class M>
concept valid_update_block = !declares_update_block<M> || has_update_block<M, float> ||
                             has_update_block<M, double>;
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
concept ImportanceMetric = detail::has_state_size<M> && detail::has_update<M, T> &&
                           detail::has_score<M, T> && detail::valid_update_block<M>;

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
  static_assert(!detail::has_state_size<M> || detail::valid_update_block<M>,
                "adalora: the importance metric's optional block hook must be `void "
                "update_block(adalora::tensor_role role, std::span<const T, adalora::metric_block> "
                "params, std::span<const T, adalora::metric_block> grads, std::span<T, "
                "adalora::metric_block * state_size> state, std::span<double, "
                "adalora::metric_block> scores) const` for T = float and/or double (a member "
                "named update_block with another signature is not taken for the hook)");
  return true;
}

}  // namespace adalora
