#pragma once
// The known-answer target of the quick start and of the examples built on its problem
// (examples/quickstart.cpp, examples/mpi_finetune, examples/libtorch_finetune): one helper, so
// that every example draws the same targets from the same random stream, in the same order.

#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include "adalora/matrix_view.hpp"

namespace adalora_examples {

/// A rank-k update U·diag(k, k−1, …, 1)·Vᵀ (out × in, row-major) with random factors: the
/// entries of U (out × k) and V (in × k) are N(0, 1/out) and N(0, 1/in), so their columns are
/// nearly orthonormal and the singular values are close to k, k−1, …, 1. Draws, for each of the
/// k components in turn, u's out entries and then v's in entries from `rng` (k = 0 draws
/// nothing and returns zeros).
inline std::vector<float> planted_update(adalora::index_t out, adalora::index_t in,
                                         adalora::index_t k, std::mt19937_64& rng) {
  using adalora::index_t;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> m(static_cast<std::size_t>(out * in), 0.0f);
  std::vector<float> u(static_cast<std::size_t>(out)), v(static_cast<std::size_t>(in));
  for (index_t c = 0; c < k; ++c) {
    for (auto& x : u) x = normal(rng) / std::sqrt(float(out));
    for (auto& x : v) x = normal(rng) / std::sqrt(float(in));
    const float s = float(k - c);
    for (index_t i = 0; i < out; ++i)
      for (index_t j = 0; j < in; ++j)
        m[static_cast<std::size_t>(i * in + j)] +=
            s * u[static_cast<std::size_t>(i)] * v[static_cast<std::size_t>(j)];
  }
  return m;
}

}  // namespace adalora_examples
