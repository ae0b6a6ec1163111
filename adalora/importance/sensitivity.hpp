#pragma once
// Plain sensitivity |w · ∇w| of the current step, without smoothing.

#include <cmath>
#include <cstddef>
#include <limits>
#include <span>

#include "adalora/importance/metric.hpp"

namespace adalora {

/// Sensitivity I = |w · ∇w| (paper eq. 6, the first-order estimate of the loss change when w is
/// zeroed), of the current step only. Noisy under mini-batches, which is why AdaLoRA smooths
/// it (smoothed_sensitivity); offered as an ablation and as the simplest reference metric.
/// State: the last step's I, so that frozen-score phases still have a score.
struct sensitivity {
  static constexpr std::size_t state_size = 1;

  template <class T>
  T update(tensor_role, T param, T grad, std::span<T, state_size> state) const noexcept {
    const T ipt = std::abs(param * grad);
    // A product beyond T's range keeps the last finite value (see smoothed_sensitivity).
    state[0] = ipt <= std::numeric_limits<T>::max() ? ipt : state[0];
    return state[0];
  }

  template <class T>
  T score(tensor_role, T, std::span<const T, state_size> state) const noexcept {
    return state[0];
  }
};

}  // namespace adalora
