#pragma once
// A change of rank (the library's triplet_map: compaction or growth) applied to a tensor that the
// demo stores in an Eigen object: the adapters' A, E, B, their gradients and Adam's moments.
// Drops are done in place with adalora::compact_rows / compact_entries / compact_columns, and the
// Eigen object then keeps the compacted prefix; growth copies into a new object of the new rank
// with adalora::remap_rows / remap_entries / remap_columns (new triplets 0).

#include <Eigen/Core>

#include <stdexcept>
#include <string>

#include "adalora/adalora.hpp"

namespace finetune {

/// Where a tensor's triplet axis is: A-like r × n (rows), E-like r (entries), B-like n × r
/// (columns); stored row-major and contiguous.
enum class triplet_axis { rows, entries, columns };

/// Applies `m` to the tensor stored in `x` (contiguous, row-major: a row-major matrix, or a
/// vector holding the same numbers flat); `n` is the other extent (1 for entries). A rank-0
/// tensor (no memory at all) works both ways.
template <class Dense>
void change_rank(Dense& x, triplet_axis axis, Eigen::Index n, const adalora::triplet_map& m) {
  if (m.identity()) return;
  const Eigen::Index r0 = m.old_rank, r1 = m.new_rank();
  const Eigen::Index rows0 = axis == triplet_axis::columns ? n : r0;
  const Eigen::Index cols0 = axis == triplet_axis::columns ? r0 : axis == triplet_axis::rows ? n : 1;
  const Eigen::Index rows1 = axis == triplet_axis::columns ? n : r1;
  const Eigen::Index cols1 = axis == triplet_axis::columns ? r1 : cols0;
  if (x.size() != rows0 * cols0)
    throw std::invalid_argument("finetune::change_rank: the tensor has " +
                                std::to_string(x.size()) + " numbers, its old shape " +
                                std::to_string(rows0) + " x " + std::to_string(cols0) +
                                " needs " + std::to_string(rows0 * cols0));
  const auto view = [](float* p, Eigen::Index rows, Eigen::Index cols) {
    return adalora::matrix_view<float>(p, rows, cols, cols, 1);
  };
  // A vector object stores rows × cols flat.
  const auto resized = [](Eigen::Index rows, Eigen::Index cols) {
    Dense y;
    if constexpr (Dense::ColsAtCompileTime == 1)
      y.resize(rows * cols);
    else
      y.resize(rows, cols);
    return y;
  };
  if (m.added() == 0) {  // drops only: in place, then keep the prefix
    const adalora::matrix_view<float> v = view(x.data(), rows0, cols0);
    if (axis == triplet_axis::rows)
      adalora::compact_rows(v, m);
    else if (axis == triplet_axis::columns)
      adalora::compact_columns(v, m);  // repacks to rows × r1, contiguous
    else
      adalora::compact_entries(adalora::vector_view<float>(x.data(), r0, 1), m);
    Dense y = resized(rows1, cols1);
    if (y.size() > 0) y = Eigen::Map<const Dense>(x.data(), y.rows(), y.cols());
    x.swap(y);
    return;
  }
  Dense y = resized(rows1, cols1);
  const adalora::matrix_view<const float> from = view(x.data(), rows0, cols0);
  const adalora::matrix_view<float> to = view(y.data(), rows1, cols1);
  if (axis == triplet_axis::rows)
    adalora::remap_rows(from, m, to);
  else if (axis == triplet_axis::columns)
    adalora::remap_columns(from, m, to);
  else
    adalora::remap_entries(adalora::vector_view<const float>(x.data(), r0, 1), m,
                           adalora::vector_view<float>(y.data(), r1, 1));
  x.swap(y);
}

}  // namespace finetune
