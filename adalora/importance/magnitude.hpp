#pragma once
// Magnitude-based importance: no gradient, only the size of the parameters.

#include <cmath>
#include <cstddef>
#include <span>

#include "adalora/importance/metric.hpp"

namespace adalora {

/// |λ_i| alone: the paper's ablation that prunes the smallest singular values (like a truncated
/// SVD). Elements of A and B score 0, so a triplet's score is |E_i|. Stateless.
struct magnitude {
  static constexpr std::size_t state_size = 0;

  template <class T>
  T update(tensor_role role, T param, T, std::span<T, 0>) const noexcept {
    return role == tensor_role::E ? std::abs(param) : T(0);
  }
  template <class T>
  T score(tensor_role role, T param, std::span<const T, 0>) const noexcept {
    return role == tensor_role::E ? std::abs(param) : T(0);
  }
};

/// |w| for every element of A, E and B: loralib's `calculate_score(metric="mag")` option, so the
/// triplet score is |E_i| + mean_j |A_ij| + mean_j |B_ji|. Stateless.
struct parameter_magnitude {
  static constexpr std::size_t state_size = 0;

  template <class T>
  T update(tensor_role, T param, T, std::span<T, 0>) const noexcept {
    return std::abs(param);
  }
  template <class T>
  T score(tensor_role, T param, std::span<const T, 0>) const noexcept {
    return std::abs(param);
  }
};

}  // namespace adalora
