#pragma once
// Compaction of adapters held in torch tensors (issue 17, docs/compaction.md): once the
// allocator's pattern is final, rank_allocator::compact() drops the pruned triplets from its own
// state and returns, per adapter, the map from kept triplet to old index. Everything else with a
// triplet axis is the user's and is gathered here with the same map: A (r × in) and E (r × 1) by
// rows, B (out × r) by columns, their .grad(), and the optimizer's moments for each of them.
//
// Each tensor shrinks under its own identity: set_data() swaps a gathered copy into the same
// TensorImpl, so the model's handles, the optimizer's parameter list and its state (keyed by the
// TensorImpl) all see the smaller tensor and nothing has to be re-registered. A rank-0 adapter
// (every triplet pruned) is tensors with a zero dimension: its products are empty and add 0.

#include <torch/torch.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "examples/transformer/model.hpp"

namespace transformer {

namespace detail {

/// The moments torch's Adam and AdamW keep per parameter, gathered along `dim`.
template <class State>
bool gather_moments(torch::optim::OptimizerParamState& s, std::int64_t dim, const torch::Tensor& index) {
  auto* m = dynamic_cast<State*>(&s);
  if (m == nullptr) return false;
  m->exp_avg(m->exp_avg().index_select(dim, index));
  m->exp_avg_sq(m->exp_avg_sq().index_select(dim, index));
  if (m->max_exp_avg_sq().defined()) m->max_exp_avg_sq(m->max_exp_avg_sq().index_select(dim, index));
  return true;
}

/// p, p.grad() and p's optimizer state, gathered along `dim` (the triplet axis) at `index`.
inline void gather_triplets(torch::Tensor& p, std::int64_t dim, const torch::Tensor& index,
                            torch::optim::Optimizer& optimizer, const std::string& name) {
  torch::NoGradGuard no_grad;
  const std::string key = c10::guts::to_string(p.unsafeGetTensorImpl());
  const torch::Tensor grad = p.grad();
  p.set_data(p.detach().index_select(dim, index));
  if (grad.defined()) p.mutable_grad() = grad.index_select(dim, index);
  const auto it = optimizer.state().find(key);
  if (it == optimizer.state().end()) return;  // no step taken yet: no state to gather
  if (!gather_moments<torch::optim::AdamWParamState>(*it->second, dim, index) &&
      !gather_moments<torch::optim::AdamParamState>(*it->second, dim, index))
    throw std::invalid_argument("transformer::compact_adapter: " + name +
                                ": the optimizer's state must be torch::optim::Adam's or AdamW's "
                                "(the moments gathered with the triplets), got another kind");
}

}  // namespace detail

/// Adapter `a` keeps the triplets `m` names: A, E and B, their gradients and the optimizer's
/// moments for them. Throws std::invalid_argument for an adapter that is not AdaLoRA's or a map
/// that does not fit it (checked before anything moves).
inline void compact_adapter(adapted_linear& a, const adalora::triplet_map& m,
                            torch::optim::Optimizer& optimizer) {
  constexpr const char* where = "transformer::compact_adapter";
  if (a.kind != adapter_kind::adalora)
    throw std::invalid_argument(std::string(where) + ": " + a.name +
                                ": expected an AdaLoRA adapter (A, E, B), got another kind");
  if (m.old_rank != a.A.size(0))
    throw std::invalid_argument(std::string(where) + ": " + a.name + ": the map's old rank must be the adapter's rank " +
                                std::to_string(a.A.size(0)) + ", got " + std::to_string(m.old_rank));
  for (std::size_t i = 0; i < m.source.size(); ++i)
    if (m.source[i] < 0 || m.source[i] >= m.old_rank || (i > 0 && m.source[i] <= m.source[i - 1]))
      throw std::invalid_argument(std::string(where) + ": " + a.name +
                                  ": the map must keep old triplets in increasing order (compaction "
                                  "adds none), got " + std::to_string(m.source[i]) + " at " + std::to_string(i));
  const torch::Tensor index = torch::tensor(std::vector<std::int64_t>(m.source.begin(), m.source.end()), torch::kInt64);
  detail::gather_triplets(a.A, 0, index, optimizer, a.name + ".lora_A");
  detail::gather_triplets(a.E, 0, index, optimizer, a.name + ".lora_E");
  detail::gather_triplets(a.B, 1, index, optimizer, a.name + ".lora_B");
}

/// Once allocator.pattern_final(): compacts the allocator, then every adapter (in the set's
/// order, which is `adapters`' order) and the set's views of them. Returns the change.
inline adalora::rank_change compact_adapters(const std::vector<adapted_linear*>& adapters,
                                             adalora::rank_allocator<float>& allocator,
                                             adalora::adapter_set<float>& set,
                                             torch::optim::Optimizer& optimizer) {
  if (adapters.size() != set.size())
    throw std::invalid_argument("transformer::compact_adapters: one adapter per entry of the set, " +
                                std::to_string(set.size()) + ", got " + std::to_string(adapters.size()));
  const adalora::rank_change change = allocator.compact();
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    adapted_linear& a = *adapters[i];
    compact_adapter(a, change[i], optimizer);
    set.replace(i, adalora::torch_adapter_ref<float>(a.A, a.E, a.B),
                adalora::torch_adapter_grad_ref<float>(a.A, a.E, a.B));
  }
  return change;
}

}  // namespace transformer
