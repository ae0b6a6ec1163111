#pragma once
// Rank that changes physically: which old triplet each triplet of an adapter is after its rank
// changed (compaction drops pruned triplets, growth appends new ones), and the moves that apply
// that map to any tensor shaped like A (r × in), E (r) or B (out × r): the adapter's parameters,
// their gradients, and whatever state the user's optimizer keeps for them (Adam's moments).
//
// The rank allocator decides a change and returns it (rank_allocator::compact, ::grow); the
// user's memory is the user's, so the same map is then applied, with the functions below, to
// every tensor that has a triplet axis. Old triplets keep their order; new ones come last.
//
// Docs: docs/compaction.md (what is exact), docs/growth.md.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// Marks a triplet that did not exist before the change.
inline constexpr index_t new_triplet = -1;

/// One adapter's change of rank: new triplet i is old triplet source[i], or new_triplet. The old
/// triplets that stay are in increasing order, and the new ones follow them.
struct triplet_map {
  index_t old_rank = 0;
  std::vector<index_t> source;

  index_t new_rank() const noexcept { return static_cast<index_t>(source.size()); }
  /// Triplets appended by the change.
  index_t added() const noexcept {
    return static_cast<index_t>(std::count(source.begin(), source.end(), new_triplet));
  }
  /// Old triplets the change dropped.
  index_t dropped() const noexcept { return old_rank - (new_rank() - added()); }
  /// True when nothing moves: every old triplet stays where it was and none is added.
  bool identity() const noexcept { return new_rank() == old_rank && added() == 0; }

  friend bool operator==(const triplet_map&, const triplet_map&) = default;

  /// The map that keeps the triplets where `keep` is true (keep.size() = old rank).
  template <class Mask>
  static triplet_map keeping(const Mask& keep) {
    triplet_map m;
    m.old_rank = static_cast<index_t>(std::size(keep));
    for (index_t i = 0; i < m.old_rank; ++i)
      if (keep[static_cast<std::size_t>(i)]) m.source.push_back(i);
    return m;
  }
  /// The map that keeps every old triplet and appends `count` new ones.
  static triplet_map appending(index_t old_rank, index_t count) {
    triplet_map m;
    m.old_rank = old_rank;
    for (index_t i = 0; i < old_rank; ++i) m.source.push_back(i);
    m.source.insert(m.source.end(), static_cast<std::size_t>(count), new_triplet);
    return m;
  }
};

/// The maps of one change, one per adapter in the allocator's (and the adapter_set's) order.
using rank_change = std::vector<triplet_map>;

namespace detail {

/// Throws unless `m` is a valid map: old indices in [0, old_rank), strictly increasing, new
/// triplets only after them; with `compaction_only`, no new triplets at all.
inline void check_triplet_map(const triplet_map& m, bool compaction_only, const char* where) {
  ADALORA_REQUIRE(m.old_rank >= 0, where, "the map's old rank must be >= 0, got ", m.old_rank);
  index_t previous = -1;
  bool seen_new = false;
  for (std::size_t i = 0; i < m.source.size(); ++i) {
    const index_t s = m.source[i];
    if (s == new_triplet) {
      ADALORA_REQUIRE(!compaction_only, where, "this move only drops triplets (in place), but the "
                      "map adds one at ", i, "; grow with remap() into larger tensors instead");
      seen_new = true;
      continue;
    }
    ADALORA_REQUIRE(!seen_new, where, "old triplets must come before new ones, got old triplet ",
                    s, " at ", i, " after a new one");
    ADALORA_REQUIRE(s > previous && s < m.old_rank, where, "old triplet indices must increase "
                    "and lie in [0, ", m.old_rank, "), got ", s, " at ", i,
                    previous >= 0 ? " after " : "", previous >= 0 ? std::to_string(previous) : "");
    previous = s;
  }
}

}  // namespace detail

// ---- in place: compaction ----------------------------------------------------------------------
//
// Dropping triplets never needs more memory, so it is done where the tensor lies. Elements move
// in increasing triplet order, and new triplet i comes from old triplet source[i] >= i, so no
// element is overwritten before it is read, whatever the strides. The returned view is of the
// same memory with the new rank; the strides are kept, except that a row-major contiguous B is
// repacked to out × new rank (row o moves to o · new rank: again never ahead of what it reads).

/// Rows of an A-shaped tensor (r × in): row i becomes old row source[i].
template <class T>
matrix_view<T> compact_rows(matrix_view<T> a, const triplet_map& m) {
  static_assert(!std::is_const_v<T>, "adalora::compact_rows: the view must be mutable");
  constexpr const char* where = "compact_rows";
  detail::check_triplet_map(m, true, where);
  ADALORA_REQUIRE(a.rows() == m.old_rank, where, "the tensor must have ", m.old_rank,
                  " rows (the map's old rank), got ", a.rows());
  for (index_t i = 0; i < m.new_rank(); ++i) {
    const index_t s = m.source[static_cast<std::size_t>(i)];
    if (s == i) continue;
    for (index_t j = 0; j < a.cols(); ++j) a(i, j) = a(s, j);
  }
  return a.block(0, 0, m.new_rank(), a.cols());
}

/// Entries of an E-shaped tensor (r).
template <class T>
vector_view<T> compact_entries(vector_view<T> e, const triplet_map& m) {
  static_assert(!std::is_const_v<T>, "adalora::compact_entries: the view must be mutable");
  constexpr const char* where = "compact_entries";
  detail::check_triplet_map(m, true, where);
  ADALORA_REQUIRE(e.size() == m.old_rank, where, "the tensor must have ", m.old_rank,
                  " entries (the map's old rank), got ", e.size());
  for (index_t i = 0; i < m.new_rank(); ++i) e[i] = e[m.source[static_cast<std::size_t>(i)]];
  return vector_view<T>(e.data(), m.new_rank(), e.stride());
}

/// Columns of a B-shaped tensor (out × r). A row-major contiguous one stays contiguous.
template <class T>
matrix_view<T> compact_columns(matrix_view<T> b, const triplet_map& m) {
  static_assert(!std::is_const_v<T>, "adalora::compact_columns: the view must be mutable");
  constexpr const char* where = "compact_columns";
  detail::check_triplet_map(m, true, where);
  ADALORA_REQUIRE(b.cols() == m.old_rank, where, "the tensor must have ", m.old_rank,
                  " columns (the map's old rank), got ", b.cols());
  const index_t k = m.new_rank();
  if (b.is_row_major_contiguous() && b.rows() > 1) {
    T* d = b.data();
    for (index_t o = 0; o < b.rows(); ++o)
      for (index_t i = 0; i < k; ++i) d[o * k + i] = d[o * m.old_rank + m.source[static_cast<std::size_t>(i)]];
    return matrix_view<T>(d, b.rows(), k, k, 1);
  }
  for (index_t i = 0; i < k; ++i) {
    const index_t s = m.source[static_cast<std::size_t>(i)];
    if (s == i) continue;
    for (index_t o = 0; o < b.rows(); ++o) b(o, i) = b(o, s);
  }
  return b.block(0, 0, b.rows(), k);
}

/// All three tensors of an adapter (its parameters, its gradients, or an optimizer's state laid
/// out like them); returns the views of the compacted tensors.
template <class T>
svd_adapter_ref<T> compact(const svd_adapter_ref<T>& t, const triplet_map& m) {
  t.check_shapes("compact", "tensors");
  return {compact_rows(t.A, m), compact_entries(t.E, m), compact_columns(t.B, m)};
}

// ---- out of place: any change ------------------------------------------------------------------
//
// Growth needs room the old tensors may not have, so it copies into tensors of the new rank that
// the caller provides (and that must not overlap the old ones). New triplets get `fill`: zero
// for gradients and optimizer state; parameters are then initialised by a growth init policy.

/// Rows of an A-shaped tensor: to(i, :) = from(source[i], :), or fill.
template <class T>
void remap_rows(matrix_view<const T> from, const triplet_map& m, matrix_view<T> to, T fill = T(0)) {
  constexpr const char* where = "remap_rows";
  detail::check_triplet_map(m, false, where);
  ADALORA_REQUIRE(from.rows() == m.old_rank && to.rows() == m.new_rank() && from.cols() == to.cols(),
                  where, "expected ", m.old_rank, " x n into ", m.new_rank(), " x n (the map's ranks), got ",
                  from.rows(), " x ", from.cols(), " into ", to.rows(), " x ", to.cols());
  for (index_t i = 0; i < m.new_rank(); ++i) {
    const index_t s = m.source[static_cast<std::size_t>(i)];
    for (index_t j = 0; j < to.cols(); ++j) to(i, j) = s == new_triplet ? fill : from(s, j);
  }
}

/// Entries of an E-shaped tensor.
template <class T>
void remap_entries(vector_view<const T> from, const triplet_map& m, vector_view<T> to, T fill = T(0)) {
  constexpr const char* where = "remap_entries";
  detail::check_triplet_map(m, false, where);
  ADALORA_REQUIRE(from.size() == m.old_rank && to.size() == m.new_rank(), where, "expected ",
                  m.old_rank, " entries into ", m.new_rank(), " (the map's ranks), got ",
                  from.size(), " into ", to.size());
  for (index_t i = 0; i < m.new_rank(); ++i) {
    const index_t s = m.source[static_cast<std::size_t>(i)];
    to[i] = s == new_triplet ? fill : from[s];
  }
}

/// Columns of a B-shaped tensor.
template <class T>
void remap_columns(matrix_view<const T> from, const triplet_map& m, matrix_view<T> to, T fill = T(0)) {
  constexpr const char* where = "remap_columns";
  detail::check_triplet_map(m, false, where);
  ADALORA_REQUIRE(from.cols() == m.old_rank && to.cols() == m.new_rank() && from.rows() == to.rows(),
                  where, "expected n x ", m.old_rank, " into n x ", m.new_rank(),
                  " (the map's ranks), got ", from.rows(), " x ", from.cols(), " into ", to.rows(),
                  " x ", to.cols());
  for (index_t o = 0; o < to.rows(); ++o)
    for (index_t i = 0; i < m.new_rank(); ++i) {
      const index_t s = m.source[static_cast<std::size_t>(i)];
      to(o, i) = s == new_triplet ? fill : from(o, s);
    }
}

/// All three tensors of an adapter.
template <class T>
void remap(const svd_adapter_ref<const T>& from, const triplet_map& m,
           const svd_adapter_ref<T>& to, T fill = T(0)) {
  remap_rows(from.A, m, to.A, fill);
  remap_entries(from.E, m, to.E, fill);
  remap_columns(from.B, m, to.B, fill);
}

}  // namespace adalora
