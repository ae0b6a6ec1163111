#pragma once
// What the allocator's kernel tests share: a schedule that masks at every step, and one
// adapter's tensors in either storage order.

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/budget_schedule.hpp"
#include "adalora/matrix_view.hpp"

namespace fixtures {

using adalora::index_t;

/// Masks at every step to half the initial budget.
struct every_step {
  std::int64_t b0;
  adalora::budget_decision at(std::int64_t) const { return {b0 / 2, true}; }
  std::int64_t initial_budget() const { return b0; }
  std::int64_t target_budget() const { return b0 / 2; }
  std::int64_t final_phase_start() const { return 1'000'000; }
};

/// One adapter's tensors, row-major or (col_major) with A and B stored column by column.
template <class T>
struct storage {
  adalora::adapter_shape shape;
  bool col_major;
  std::vector<T> A, E, B, gA, gE, gB;

  storage(adalora::adapter_shape s, bool cm) : shape(std::move(s)), col_major(cm) {
    const auto a = static_cast<std::size_t>(shape.rank * shape.in_features);
    const auto b = static_cast<std::size_t>(shape.out_features * shape.rank);
    A.resize(a), gA.resize(a), B.resize(b), gB.resize(b);
    E.resize(static_cast<std::size_t>(shape.rank)), gE.resize(E.size());
  }
  adalora::matrix_view<T> view(std::vector<T>& x, index_t rows, index_t cols) {
    return col_major ? adalora::matrix_view<T>(x.data(), rows, cols, 1, rows)
                     : adalora::matrix_view<T>(x.data(), rows, cols, cols, 1);
  }
  adalora::adapter_tensors<T> tensors() {
    const index_t r = shape.rank, in = shape.in_features, out = shape.out_features;
    return {{view(A, r, in), adalora::vector_view<T>(E.data(), r), view(B, out, r)},
            {view(gA, r, in), adalora::vector_view<const T>(gE.data(), r), view(gB, out, r)}};
  }
};

}  // namespace fixtures
