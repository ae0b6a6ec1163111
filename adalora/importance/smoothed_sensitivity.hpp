#pragma once
// AdaLoRA's importance: sensitivity smoothed by an EMA and weighted by its uncertainty.

#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <type_traits>

#include "adalora/config.hpp"
#include "adalora/importance/metric.hpp"

namespace adalora {

/// The AdaLoRA metric (paper eq. 8–10; loralib RankAllocator.update_ipt / calculate_score,
/// PEFT RankAllocator.update_ipt / _element_score), per element, in the references' order:
///
///     I = |w · ∇w|                          w after the optimizer step of ∇w (SPEC §3)
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
/// where torch's float score would (|w·∇w| beyond ~1.8e19 squares past FLT_MAX).
struct smoothed_sensitivity {
  struct options {
    double beta1 = 0.85;  ///< sensitivity EMA, in (0, 1)
    double beta2 = 0.85;  ///< uncertainty EMA, in (0, 1)
  };

  static constexpr std::size_t state_size = 2;

  smoothed_sensitivity() : smoothed_sensitivity(options{}) {}
  explicit smoothed_sensitivity(const options& o)
      : opts_(o), float_(coefficients<float>(o)), double_(coefficients<double>(o)) {
    ADALORA_REQUIRE(o.beta1 > 0.0 && o.beta1 < 1.0, "smoothed_sensitivity",
                    "beta1 must be in (0, 1), got ", o.beta1);
    ADALORA_REQUIRE(o.beta2 > 0.0 && o.beta2 < 1.0, "smoothed_sensitivity",
                    "beta2 must be in (0, 1), got ", o.beta2);
  }

  const options& opts() const noexcept { return opts_; }

  template <class T>
  double update(tensor_role, T param, T grad, std::span<T, state_size> state) const noexcept {
    const auto& [b1, c1, b2, c2] = coefficients_for<T>();
    const T ipt = std::abs(param * grad);
    const T ema = b1 * state[0] + c1 * ipt;
    const T unc = b2 * state[1] + c2 * std::abs(ipt - ema);
    // A product beyond T's range (|w·∇w| > FLT_MAX for finite w and ∇w) would make the state
    // infinite for good: that element keeps its state this step instead (written as selects,
    // so the loop still vectorises).
    const bool fits = unc <= std::numeric_limits<T>::max();
    state[0] = fits ? ema : state[0];
    state[1] = fits ? unc : state[1];
    return static_cast<double>(state[0]) * static_cast<double>(state[1]);
  }

  template <class T>
  double score(tensor_role, T, std::span<const T, state_size> state) const noexcept {
    return static_cast<double>(state[0]) * static_cast<double>(state[1]);
  }

 private:
  /// β1, 1 − β1, β2, 1 − β2 in T, each rounded once from double (formed here, once, rather
  /// than per element).
  template <class T>
  struct coefficient_set {
    T b1, c1, b2, c2;
  };
  template <class T>
  static coefficient_set<T> coefficients(const options& o) noexcept {
    return {static_cast<T>(o.beta1), static_cast<T>(1.0 - o.beta1), static_cast<T>(o.beta2),
            static_cast<T>(1.0 - o.beta2)};
  }
  template <class T>
  coefficient_set<T> coefficients_for() const noexcept {
    if constexpr (std::is_same_v<T, float>)
      return float_;
    else if constexpr (std::is_same_v<T, double>)
      return double_;
    else
      return coefficients<T>(opts_);
  }

  options opts_;
  coefficient_set<float> float_;
  coefficient_set<double> double_;
};

}  // namespace adalora
