// The smallest complete integration: parameters and gradients live in plain std::vector<float>,
// adalora sees them through make_matrix_view / make_vector_view (no copy), gathered in one named
// adapter_set, and rank_allocator prunes singular values after each hand-written SGD step. Two
// 8 × 8 adapters of rank 4 learn the updates ΔW = diag(3, 2, 1, 0, …) and diag(2, 0, …), of
// ranks 3 and 1.
//
//   bazel run -c opt //examples/raw_buffers

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"

int main() {
  constexpr int n = 8, r = 4, steps = 400;
  const float target[2][n] = {{3, 2, 1}, {2}};  // diagonals of the two ΔW
  struct buffers { std::vector<float> A, E, B, gA, gE, gB; };  // A: r × n, E: r, B: n × r
  std::vector<buffers> w(2);
  adalora::adapter_set<float> adapters;  // the views of every adapter, by name
  std::mt19937 rng(1);
  std::normal_distribution<float> init(0.0f, 0.3f);
  for (buffers& b : w) {
    b.A.resize(r * n), b.B.resize(n * r), b.E.assign(r, 0.0f);  // E = 0: ΔW starts at 0
    for (float& x : b.A) x = init(rng);
    for (float& x : b.B) x = init(rng);
    b.gA.assign(r * n, 0.0f), b.gE.assign(r, 0.0f), b.gB.assign(n * r, 0.0f);
    using adalora::make_matrix_view, adalora::make_vector_view;  // row-major by default
    adapters.add("w" + std::to_string(adapters.size()),
                 {make_matrix_view(b.A.data(), r, n), make_vector_view(b.E.data(), r),
                  make_matrix_view(b.B.data(), n, r)},
                 {make_matrix_view(b.gA.data(), r, n), make_vector_view(b.gE.data(), r),
                  make_matrix_view(b.gB.data(), n, r)});
  }
  // Keeps each adapter's triplets apart (orthonormal A rows, B columns), so that pruning one
  // triplet removes one direction; the paper's squared form.
  adalora::orthogonality_regularizer<float> orth(
      {.weight = 0.3, .form = adalora::orthogonality_form::paper_squared});
  // Total rank 8 (the adapters' ranks, filled in by the allocator) → 4 on the cubic schedule:
  // warm-up 40 steps, pattern fixed for the last 100.
  adalora::rank_allocator<float> allocator(
      adapters, adalora::cubic_schedule({.target_budget = 4, .total_step = steps, .tinit = 40,
                                         .tfinal = 100, .delta_t = 10}));

  for (int t = 0; t < steps; ++t) {
    for (int k = 0; k < 2; ++k) {  // gradients of ½ ||B·diag(E)·A − ΔW||², entry by entry
      buffers& b = w[k];
      for (int o = 0; o < n; ++o)
        for (int j = 0; j < n; ++j) {
          float y = 0.0f;
          for (int i = 0; i < r; ++i) y += b.B[o * r + i] * b.E[i] * b.A[i * n + j];
          const float res = y - (o == j ? target[k][o] : 0.0f);
          for (int i = 0; i < r; ++i) {
            b.gA[i * n + j] += res * b.B[o * r + i] * b.E[i];
            b.gE[i] += res * b.B[o * r + i] * b.A[i * n + j];
            b.gB[o * r + i] += res * b.E[i] * b.A[i * n + j];
          }
        }
    }
    orth.value_and_gradient(adapters);  // adds its gradient into gA, gB
    for (buffers& b : w) {  // SGD
      for (int i = 0; i < r * n; ++i) b.A[i] -= 0.1f * b.gA[i], b.B[i] -= 0.1f * b.gB[i];
      for (int i = 0; i < r; ++i) b.E[i] -= 0.1f * b.gE[i];
    }
    allocator.step(t, adapters);  // after the optimizer step, before the gradients are cleared
    for (buffers& b : w)
      for (auto* g : {&b.gA, &b.gE, &b.gB}) std::fill(g->begin(), g->end(), 0.0f);
  }
  const auto kept = allocator.last_result().kept;
  std::printf("kept ranks %td and %td (planted 3 and 1)\n", kept[0], kept[1]);
  return 0;
}
