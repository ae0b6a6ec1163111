#pragma once
// AdaLoRA's importance: sensitivity smoothed by an EMA and weighted by its uncertainty.

#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <type_traits>

#include "adalora/config.hpp"
#include "adalora/detail/sensitivity_simd.hpp"
#include "adalora/importance/metric.hpp"

namespace adalora {

/// The AdaLoRA metric (paper eq. 8–10; loralib RankAllocator.update_ipt / calculate_score,
/// PEFT RankAllocator.update_ipt / _element_score), per element, in the references' order:
///
///     I = |w · ∇w|                          w after the optimizer step of ∇w (docs/algorithm.md §3)
///     Ī ← β1·Ī + (1 − β1)·I                 sensitivity EMA first,
///     Ū ← β2·Ū + (1 − β2)·|I − Ī|           then uncertainty, with the NEW Ī
///     score = Ī · Ū
///
/// Bit parity with torch: β and (1 − β) are formed in double and rounded to T once (torch
/// rounds the Python scalar `1 - beta` to the tensor's dtype), each product and the sum are
/// rounded separately (build with -ffp-contract=off so that no FMA fuses them), and there is no
/// bias correction. State: {Ī, Ū}, zero at the start.
/// The score Ī·Ū is returned in double: for float the product of two floats is exact in double
/// (so rounding it to float gives torch's float product bit for bit), and it cannot overflow
/// where torch's float score would (|w·∇w| beyond ~1.8e19 squares past FLT_MAX). For double it
/// can (Ī, Ū beyond ~1.3e154): it is +inf then, as torch's float64 score, and the allocator
/// ranks it above every finite score (scores_may_overflow); the state itself stays finite.
struct smoothed_sensitivity {
  struct options {
    double beta1 = 0.85;  ///< sensitivity EMA, in (0, 1)
    double beta2 = 0.85;  ///< uncertainty EMA, in (0, 1)
  };

  static constexpr std::size_t state_size = 2;
  static constexpr bool scores_may_overflow = true;

  smoothed_sensitivity() : smoothed_sensitivity(options{}) {}
  explicit smoothed_sensitivity(const options& o)
      : opts_(o), float_(make_coefficients<float>(o)), double_(make_coefficients<double>(o)) {
    ADALORA_REQUIRE(o.beta1 > 0.0 && o.beta1 < 1.0, "smoothed_sensitivity",
                    "beta1 must be in (0, 1), got ", o.beta1);
    ADALORA_REQUIRE(o.beta2 > 0.0 && o.beta2 < 1.0, "smoothed_sensitivity",
                    "beta2 must be in (0, 1), got ", o.beta2);
  }

  const options& opts() const noexcept { return opts_; }

  template <class T>
  double update(tensor_role, T param, T grad, std::span<T, state_size> state) const noexcept {
    const coefficient_set<T>& c = coefficients<T>();
    const T old_ema = state[0], old_unc = state[1];
    const T ipt = std::abs(param * grad);
    const T ema = c.b1 * old_ema + c.c1 * ipt;
    const T unc = c.b2 * old_unc + c.c2 * std::abs(ipt - ema);
    // A product beyond T's range (|w·∇w| > FLT_MAX for finite w and ∇w) would make the state
    // infinite for good: that element keeps its state this step instead. Written as selects of
    // values already loaded and unconditional stores, so that the loop still vectorises (a
    // select that re-reads the state compiles to a conditional store, which does not).
    const bool fits = unc <= std::numeric_limits<T>::max();
    const T new_ema = fits ? ema : old_ema;
    const T new_unc = fits ? unc : old_unc;
    state[0] = new_ema;
    state[1] = new_unc;
    return static_cast<double>(new_ema) * static_cast<double>(new_unc);
  }

  template <class T>
  double score(tensor_role, T, std::span<const T, state_size> state) const noexcept {
    return static_cast<double>(state[0]) * static_cast<double>(state[1]);
  }

#if ADALORA_SENSITIVITY_SIMD
  /// The block hook (importance/metric.hpp): update() of eight contiguous float elements at
  /// once, hand-vectorised (detail/sensitivity_simd.hpp), bit-identical to update(). Float
  /// only: in double g++ vectorises update() well enough by itself. Always inlined: the
  /// allocator calls it in its innermost loop, where a call would cost more than the work.
  /// A NaN or infinite param or grad makes |w·∇w|, and so the new Ū, NaN or infinite, and the
  /// guard that keeps the state of an overflowing element keeps that element's state too.
  static constexpr bool update_block_keeps_non_finite_state = true;
  [[gnu::always_inline]] void update_block(tensor_role, std::span<const float, metric_block> params,
                                           std::span<const float, metric_block> grads,
                                           std::span<float, metric_block * state_size> state,
                                           std::span<double, metric_block> scores) const noexcept {
    detail::sensitivity_update(float_.b1, float_.c1, float_.b2, float_.c2, params.data(),
                               grads.data(), state.data(), scores.data());
  }
#endif

 private:
  /// β1, 1 − β1, β2, 1 − β2 in T, each rounded once from double (formed at construction, once,
  /// rather than per element).
  template <class T>
  struct coefficient_set {
    T b1, c1, b2, c2;
  };
  /// The coefficients update() uses for T (float or double). By reference: a struct returned by
  /// value is copied as a whole inside the caller's loop, which g++ then cannot vectorise.
  template <class T>
  const coefficient_set<T>& coefficients() const noexcept {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "smoothed_sensitivity: the element type must be float or double");
    if constexpr (std::is_same_v<T, float>)
      return float_;
    else
      return double_;
  }

  template <class T>
  static coefficient_set<T> make_coefficients(const options& o) noexcept {
    return {static_cast<T>(o.beta1), static_cast<T>(1.0 - o.beta1), static_cast<T>(o.beta2),
            static_cast<T>(1.0 - o.beta2)};
  }

  options opts_;
  coefficient_set<float> float_;
  coefficient_set<double> double_;
};

}  // namespace adalora
