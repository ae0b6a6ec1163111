#pragma once
// Shard arithmetic: how adapters are split over P processes for the sharded rank allocator
// (see communicator.hpp), and the views of a slice cut out of views of a whole adapter. Plain
// index arithmetic: no MPI here, so a program (or a test) can plan and check a sharding with
// any communicator, adalora/testing/in_process_communicator.hpp's included.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// A contiguous range [begin, begin + count).
struct index_slice {
  index_t begin = 0;
  index_t count = 0;
};

/// Part `part` of `parts` of n items in contiguous slices whose sizes differ by at most one (the
/// first n % parts slices are one longer).
constexpr index_slice even_slice(index_t n, int part, int parts) {
  const index_t p = part, q = parts, base = n / q, extra = n % q;
  return {p * base + std::min(p, extra), base + (p < extra ? 1 : 0)};
}

/// How shard_shapes() splits the adapters over the ranks.
enum class shard_layout : std::uint8_t {
  /// Every rank holds everything (data-parallel with the allocator's work split is NOT this:
  /// replicated shards each score everything; use it with single_process).
  replicated,
  /// Each rank holds a contiguous slice of every adapter's triplets: rows of A, entries of E,
  /// columns of B (in_features and out_features whole).
  triplets,
  /// Each rank holds every triplet but a contiguous slice of A's columns and of B's rows, in
  /// whole blocks of score_sum_block (256) elements; E is replicated on every rank
  /// and scored by rank 0 only (adapter_shard::scores_e).
  blocks,
  /// Each rank holds a contiguous group of whole adapters, groups balanced by element count.
  adapters,
};

/// This rank's shard of one adapter under the triplets, blocks or replicated layout (for
/// adapters, use shard_shapes: the split depends on all the shapes). The result has no "-1 = to
/// the end" counts. Throws std::invalid_argument on a bad part/parts or layout.
inline adapter_shard shard_of(const adapter_shape& s, shard_layout layout, int part, int parts) {
  constexpr const char* where = "shard_of";
  ADALORA_REQUIRE(parts >= 1 && part >= 0 && part < parts, where,
                  "part must be in [0, parts) with parts >= 1, got part ", part, " of ", parts);
  ADALORA_REQUIRE(layout != shard_layout::adapters, where,
                  "shard_layout::adapters splits whole adapters: use shard_shapes()");
  adapter_shard h{0, s.rank, 0, s.in_features, 0, s.out_features, true};
  if (layout == shard_layout::triplets) {
    const index_slice t = even_slice(s.rank, part, parts);
    h.triplet_begin = t.begin;
    h.triplet_count = t.count;
  } else if (layout == shard_layout::blocks) {
    // Whole blocks, so that every block sum is formed on one rank, as in one process.
    constexpr index_t blk = score_sum_block;
    auto cut = [&](index_t n, index_t& begin, index_t& count) {
      const index_slice b = even_slice((n + blk - 1) / blk, part, parts);
      begin = b.count > 0 ? b.begin * blk : 0;  // an empty slice must still start on a block
      count = b.count > 0 ? std::min(n, (b.begin + b.count) * blk) - begin : 0;
    };
    cut(s.in_features, h.in_begin, h.in_count);
    cut(s.out_features, h.out_begin, h.out_count);
    h.scores_e = part == 0;
  }
  return h;
}

/// The shapes a rank gives its sharded allocator: `shapes` (whole adapters) with this rank's
/// shard under `layout`. Every rank must use the same shapes, layout and parts.
inline std::vector<adapter_shape> shard_shapes(std::vector<adapter_shape> shapes,
                                               shard_layout layout, int part, int parts) {
  constexpr const char* where = "shard_shapes";
  ADALORA_REQUIRE(parts >= 1 && part >= 0 && part < parts, where,
                  "part must be in [0, parts) with parts >= 1, got part ", part, " of ", parts);
  if (layout != shard_layout::adapters) {
    for (adapter_shape& s : shapes) s.shard = shard_of(s, layout, part, parts);
    return shapes;
  }
  // Adapter a goes to the part that holds the middle of its elements in the running total:
  // contiguous, ordered groups of roughly equal weight, computed alike on every rank.
  std::int64_t total = 0;
  for (const adapter_shape& s : shapes) total += s.rank * (s.in_features + s.out_features + 1);
  std::int64_t before = 0;
  for (std::size_t a = 0; a < shapes.size(); ++a) {
    adapter_shape& s = shapes[a];
    const std::int64_t w = s.rank * (s.in_features + s.out_features + 1);
    const std::int64_t owner =
        total == 0 ? static_cast<std::int64_t>(a) % parts
                   : std::min<std::int64_t>(parts - 1, (2 * before + w) * parts / (2 * total));
    before += w;
    s.shard = {0, owner == part ? s.rank : 0, 0, s.in_features, 0, s.out_features, true};
  }
  return shapes;
}

/// The views of the slice `shard` describes, cut out of views of a whole adapter (for programs
/// that hold whole tensors and give the allocator their slice). "-1" counts mean "to the end".
template <class V>
svd_adapter_ref<V> shard_view(const svd_adapter_ref<V>& whole, const adapter_shard& shard) {
  constexpr const char* where = "shard_view";
  whole.check_shapes(where, "whole");
  const index_t r = whole.rank(), in = whole.in_features(), out = whole.out_features();
  auto resolve = [&](index_t begin, index_t count, index_t n, const char* what) {
    if (count < 0) count = n - begin;
    ADALORA_REQUIRE(begin >= 0 && count >= 0 && begin + count <= n, where, "shard ", what, " [",
                    begin, ", ", begin + count, ") must lie within [0, ", n, "]");
    return count;
  };
  const index_t tc = resolve(shard.triplet_begin, shard.triplet_count, r, "triplets");
  const index_t ic = resolve(shard.in_begin, shard.in_count, in, "in columns");
  const index_t oc = resolve(shard.out_begin, shard.out_count, out, "out rows");
  const index_t tb = shard.triplet_begin;
  return {whole.A.block(tb, shard.in_begin, tc, ic),
          vector_view<V>(tc > 0 ? &whole.E[tb] : whole.E.data(), tc, whole.E.stride()),
          whole.B.block(shard.out_begin, tb, oc, tc)};
}

}  // namespace adalora
