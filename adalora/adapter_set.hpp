#pragma once
// One named set of adapters: what the orthogonality regularizer and the rank allocator both take.
//
// Each adapter is added once, with its name (the module path that keys the rank pattern) and the
// views of its parameters and gradients; the set keeps those views in the layouts both policies
// read (parallel spans of parameters and gradients for the regularizer, adapter_tensors for the
// allocator), so a step passes the set and nothing is rebuilt. Shapes are read off the views,
// and the allocator derives its initial budget from them:
//
//   adalora::adapter_set<float> adapters;
//   for (auto& [name, layer] : model) adapters.add(name, layer.adapter);   // an svd_adapter
//   adalora::rank_allocator<float> allocator(adapters, schedule);
//   orth.value_and_gradient(adapters);  ...  allocator.step(t, adapters);
//
// The set only views: the tensors must outlive it and must not move (an svd_adapter's tensors
// stay put when the svd_adapter object itself is moved, e.g. inside a growing std::vector).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "adalora/adapter_shape.hpp"
#include "adalora/config.hpp"
#include "adalora/rank_change.hpp"
#include "adalora/svd_adapter_ref.hpp"

namespace adalora {

/// Something that owns an adapter's tensors and hands out views of them, as svd_adapter does.
template <class A, class T>
concept adapter_owner = requires(A& a) {
  { a.params() } -> std::convertible_to<svd_adapter_ref<T>>;
  { a.grads() } -> std::convertible_to<svd_adapter_ref<T>>;
};

template <class T>
class adapter_set {
 public:
  using element_type = T;

  /// Adds an adapter whose views are of the whole adapter. Throws std::invalid_argument for an
  /// empty name or one already in the set, or views whose shapes do not fit together.
  adapter_set& add(std::string name, svd_adapter_ref<T> params, svd_adapter_ref<T> grads) {
    adapter_shape shape{std::move(name), params.in_features(), params.out_features(),
                        params.rank(), {}};
    return add(std::move(shape), params, grads);
  }

  /// Adds an adapter that owns its tensors (an svd_adapter<T>): its params() and grads().
  template <adapter_owner<T> Owner>
  adapter_set& add(std::string name, Owner& adapter) {
    return add(std::move(name), svd_adapter_ref<T>(adapter.params()),
               svd_adapter_ref<T>(adapter.grads()));
  }

  /// Adds this process's shard of an adapter (sharded training, see sharding.hpp): `shape` is
  /// the WHOLE adapter's, with the shard that the views hold; the views are of the shard.
  adapter_set& add(adapter_shape shape, svd_adapter_ref<T> params, svd_adapter_ref<T> grads) {
    constexpr const char* where = "adapter_set::add";
    ADALORA_REQUIRE(!shape.name.empty(), where, "adapter ", shapes_.size(),
                    " needs a name (it keys the rank pattern), got an empty one");
    for (std::size_t a = 0; a < shapes_.size(); ++a)
      ADALORA_REQUIRE(shapes_[a].name != shape.name, where, "the name '", shape.name,
                      "' is already adapter ", a, "'s; names key the rank pattern and must be "
                      "unique");
    params.check_shapes(where, "params");
    check_same_shapes(params, grads, where);
    total_rank_ += shape.rank;
    shapes_.push_back(std::move(shape));
    params_.push_back(params);
    grads_.push_back(grads);
    tensors_.push_back({params, grads});
    return *this;
  }

  /// Applies a compaction (rank_allocator::compact) to the adapters' parameters and gradients
  /// where they lie, and views the compacted tensors (same memory, the kept rank; see
  /// rank_change.hpp for the layouts). The optimizer's state is the caller's: apply the same
  /// change to it with adalora::compact. All maps are checked before anything moves.
  void compact(const rank_change& change) {
    constexpr const char* where = "adapter_set::compact";
    check_change(change, where);
    for (const triplet_map& m : change) detail::check_triplet_map(m, true, where);
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      replace_views(a, adalora::compact(params_[a], change[a]), adalora::compact(grads_[a], change[a]));
    }
  }

  /// Views other tensors for adapter `a` (after growth into new memory, or a compaction done
  /// elsewhere): the same adapter, of the rank the views have. Throws std::invalid_argument for
  /// an index out of range, views whose shapes do not fit together, or other in/out features.
  void replace(std::size_t a, svd_adapter_ref<T> params, svd_adapter_ref<T> grads) {
    constexpr const char* where = "adapter_set::replace";
    ADALORA_REQUIRE(a < shapes_.size(), where, "adapter index must be < ", shapes_.size(), ", got ", a);
    ADALORA_REQUIRE(detail::holds_whole(shapes_[a]), where, "adapter ", a, " ('", shapes_[a].name, "') is sharded; its rank cannot change");
    params.check_shapes(where, "params");
    check_same_shapes(params, grads, where);
    ADALORA_REQUIRE(params.in_features() == shapes_[a].in_features &&
                        params.out_features() == shapes_[a].out_features,
                    where, "adapter ", a, " ('", shapes_[a].name, "') is ", shapes_[a].out_features,
                    " x ", shapes_[a].in_features, ", got views of ", params.out_features(), " x ",
                    params.in_features());
    replace_views(a, params, grads);
  }

  std::size_t size() const noexcept { return shapes_.size(); }
  bool empty() const noexcept { return shapes_.empty(); }
  const std::string& name(std::size_t a) const { return shapes_.at(a).name; }

  /// The adapters' shapes (whole adapters, with their shards), in the order they were added.
  std::span<const adapter_shape> shapes() const noexcept { return shapes_; }
  /// The sum of the adapters' ranks: the rank allocator's initial budget.
  std::int64_t total_rank() const noexcept { return total_rank_; }

  /// The views, in the order they were added, as the regularizer and the allocator take them.
  std::span<const svd_adapter_ref<T>> params() const noexcept { return params_; }
  std::span<const svd_adapter_ref<T>> grads() const noexcept { return grads_; }
  std::span<const adapter_tensors<T>> tensors() const noexcept { return tensors_; }

 private:
  void check_change(const rank_change& change, const char* where) const {
    ADALORA_REQUIRE(change.size() == shapes_.size(), where, "needs one map per adapter, ",
                    shapes_.size(), ", got ", change.size());
    for (std::size_t a = 0; a < shapes_.size(); ++a) {
      ADALORA_REQUIRE(change[a].old_rank == shapes_[a].rank, where, "adapter ", a, " ('",
                      shapes_[a].name, "'): the map's old rank must be its rank ", shapes_[a].rank,
                      ", got ", change[a].old_rank);
      ADALORA_REQUIRE(detail::holds_whole(shapes_[a]), where, "adapter ", a,
                      " ('", shapes_[a].name, "') is sharded; its rank cannot change");
    }
  }
  void replace_views(std::size_t a, svd_adapter_ref<T> params, svd_adapter_ref<T> grads) noexcept {
    total_rank_ += params.rank() - shapes_[a].rank;
    shapes_[a].rank = params.rank();
    if (shapes_[a].shard.triplet_count != -1) shapes_[a].shard.triplet_count = params.rank();
    params_[a] = params;
    grads_[a] = grads;
    tensors_[a] = {params, grads};
  }

  std::vector<adapter_shape> shapes_;
  std::vector<svd_adapter_ref<T>> params_;
  std::vector<svd_adapter_ref<T>> grads_;
  std::vector<adapter_tensors<T>> tensors_;
  std::int64_t total_rank_ = 0;
};

}  // namespace adalora
