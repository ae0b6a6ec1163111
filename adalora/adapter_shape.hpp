#pragma once
// What the rank allocator knows of one adapter: its name and shape, the part of it this process
// holds (its shard), and the views of its tensors at a step. Shared by the allocator, the
// checkpoints, the sharding helpers and the integrations, none of which needs the others.

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <string>
#include <vector>

#include "adalora/config.hpp"
#include "adalora/matrix_view.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// The rank allocator sums scores in blocks of this many elements along a row of A or a column
/// of B and adds the block sums in block order: the fixed reduction tree that makes results
/// independent of threads and of sharding. A shard's slices of in/out start on such a block.
inline constexpr index_t score_sum_block = 256;

/// Which part of an adapter this process holds, for sharded training (see communicator.hpp).
/// The default is all of it. A process holds triplets [triplet_begin, triplet_begin +
/// triplet_count) (rows of A, entries of E, columns of B), columns [in_begin, in_begin +
/// in_count) of A and rows [out_begin, out_begin + out_count) of B; -1 means "to the end".
/// Slices of in/out must start at a multiple of score_sum_block (256), so that every
/// sum is formed over the same blocks as in one process; triplet slices may start anywhere.
/// Exactly one process must contribute the score of each E entry (`scores_e`), also when E is
/// replicated on several. A process that holds none of an adapter sets triplet_count = 0.
struct adapter_shard {
  index_t triplet_begin = 0;
  index_t triplet_count = -1;
  index_t in_begin = 0;
  index_t in_count = -1;
  index_t out_begin = 0;
  index_t out_count = -1;
  bool scores_e = true;
};

/// One adapted weight as the allocator sees it. `name` is the module path used in rank patterns
/// (PEFT writes "<name>.lora_E" keys); `rank` is the initial rank r; in/out/rank are the WHOLE
/// adapter's even when this process holds a shard of it.
struct adapter_shape {
  std::string name;
  index_t in_features = 0;
  index_t out_features = 0;
  index_t rank = 0;
  adapter_shard shard = {};
};

namespace detail {

/// True when the shard is the whole adapter ("-1 = to the end" counts included): only such an
/// adapter's rank can change (rank_change.hpp).
inline bool holds_whole(const adapter_shape& s) noexcept {
  const adapter_shard& h = s.shard;
  const auto whole = [](index_t begin, index_t count, index_t total) {
    return begin == 0 && (count == -1 || count == total);
  };
  return whole(h.triplet_begin, h.triplet_count, s.rank) &&
         whole(h.in_begin, h.in_count, s.in_features) && whole(h.out_begin, h.out_count, s.out_features);
}

/// Why these adapters' names cannot key a rank pattern (PEFT's "<name>.lora_E"): "adapter 1 has
/// an empty name", or "adapters 0 and 2 have the same name 'q'" for the first repeat in adapter
/// order; "" when they can. The allocator's constructor and read_checkpoint_config refuse what
/// this names, so that the pattern never fails after a training run.
inline std::string adapter_name_problem(const std::vector<adapter_shape>& shapes) {
  for (std::size_t a = 0; a < shapes.size(); ++a)
    if (shapes[a].name.empty()) return concat("adapter ", a, " has an empty name");
  std::vector<std::size_t> by_name(shapes.size());
  std::iota(by_name.begin(), by_name.end(), std::size_t{0});
  // Stable: equal names stay in adapter order, so each name's first two are adjacent.
  std::stable_sort(by_name.begin(), by_name.end(),
                   [&](std::size_t x, std::size_t y) { return shapes[x].name < shapes[y].name; });
  // The first repeat in adapter order: the pair whose later index is smallest.
  std::size_t first = 0, second = shapes.size();
  for (std::size_t i = 1; i < by_name.size(); ++i)
    if (shapes[by_name[i]].name == shapes[by_name[i - 1]].name && by_name[i] < second)
      first = by_name[i - 1], second = by_name[i];
  if (second == shapes.size()) return {};
  return concat("adapters ", first, " and ", second, " have the same name '", shapes[second].name, "'");
}

}  // namespace detail

/// The views the allocator needs of one adapter at a step: its parameters (after the optimizer
/// step; only E is written, to zero pruned singular values) and the gradients of that step.
template <class T>
struct adapter_tensors {
  svd_adapter_ref<T> params;
  svd_adapter_ref<const T> grads;
};

}  // namespace adalora
