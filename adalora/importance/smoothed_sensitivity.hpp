#pragma once
// AdaLoRA's importance: sensitivity smoothed by an EMA and weighted by its uncertainty.

#include <cmath>
#include <cstddef>
#include <span>

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
struct smoothed_sensitivity {
  struct options {
    double beta1 = 0.85;  ///< sensitivity EMA, in (0, 1)
    double beta2 = 0.85;  ///< uncertainty EMA, in (0, 1)
  };

  static constexpr std::size_t state_size = 2;

  smoothed_sensitivity() : smoothed_sensitivity(options{}) {}
  explicit smoothed_sensitivity(const options& o) : opts_(o) {
    ADALORA_REQUIRE(o.beta1 > 0.0 && o.beta1 < 1.0, "smoothed_sensitivity",
                    "beta1 must be in (0, 1), got ", o.beta1);
    ADALORA_REQUIRE(o.beta2 > 0.0 && o.beta2 < 1.0, "smoothed_sensitivity",
                    "beta2 must be in (0, 1), got ", o.beta2);
  }

  const options& opts() const noexcept { return opts_; }

  template <class T>
  T update(tensor_role, T param, T grad, std::span<T, state_size> state) const noexcept {
    const T b1 = static_cast<T>(opts_.beta1), c1 = static_cast<T>(1.0 - opts_.beta1);
    const T b2 = static_cast<T>(opts_.beta2), c2 = static_cast<T>(1.0 - opts_.beta2);
    const T ipt = std::abs(param * grad);
    const T ema = b1 * state[0] + c1 * ipt;
    const T unc = b2 * state[1] + c2 * std::abs(ipt - ema);
    state[0] = ema;
    state[1] = unc;
    return ema * unc;
  }

  template <class T>
  T score(tensor_role, T, std::span<const T, state_size> state) const noexcept {
    return state[0] * state[1];
  }

 private:
  options opts_;
};

}  // namespace adalora
