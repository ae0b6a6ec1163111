#pragma once
// One fine-tuning run of the encoder on the WordNet task: full fine-tuning, LoRA or AdaLoRA (and
// the ablation arms), with the same batches, AdamW, warm-up and classification head in every arm.
// AdaLoRA goes through the library's libtorch integration: the adapters' tensors and their
// .grad() are viewed once in an adapter_set, the regularizer adds its analytic gradient into
// .grad() after backward(), and the allocator runs after optimizer.step() with t from 0. With
// compaction (run_config::compact) the adapters shrink to their kept triplets as soon as the
// allocator's pattern is final (compaction.hpp) and train on at that rank.

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "examples/transformer/compaction.hpp"
#include "examples/transformer/model.hpp"

namespace transformer {

/// Token ids (n × seq, int64, [CLS] first, 0 = padding), labels (n) and lengths (n).
struct labelled_set {
  torch::Tensor ids, labels;
  std::vector<std::int64_t> lengths;
  std::int64_t size() const { return ids.defined() ? ids.size(0) : 0; }
};

/// The rows `rows` of `set`, trimmed to their longest example: padding columns cost as much as
/// tokens in every product.
inline std::pair<torch::Tensor, torch::Tensor> batch_of(const labelled_set& set,
                                                        const std::vector<std::int64_t>& rows) {
  std::int64_t longest = 1;
  for (const auto r : rows) longest = std::max(longest, set.lengths[static_cast<std::size_t>(r)]);
  const torch::Tensor index = torch::tensor(rows, torch::kInt64);
  return {set.ids.index_select(0, index).narrow(1, 0, longest).contiguous(),
          set.labels.index_select(0, index)};
}

struct evaluation {
  double loss = 0, accuracy = 0;
};

/// Mean cross-entropy and accuracy of head(pooled(x)) over `set`, in batches of similar length.
inline evaluation evaluate(const encoder& model, const torch::Tensor& head_w,
                           const torch::Tensor& head_b, const labelled_set& set,
                           std::int64_t batch = 256) {
  torch::NoGradGuard no_grad;
  std::vector<std::int64_t> order(static_cast<std::size_t>(set.size()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) {
    return set.lengths[static_cast<std::size_t>(a)] < set.lengths[static_cast<std::size_t>(b)];
  });
  double loss = 0, correct = 0;
  for (std::size_t i = 0; i < order.size(); i += static_cast<std::size_t>(batch)) {
    const std::vector<std::int64_t> rows(
        order.begin() + static_cast<std::ptrdiff_t>(i),
        order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), i + static_cast<std::size_t>(batch))));
    const auto [ids, labels] = batch_of(set, rows);
    const torch::Tensor logits = torch::linear(model.pooled(ids), head_w, head_b);
    loss += torch::cross_entropy_loss(logits, labels, {}, at::Reduction::Sum).item<double>();
    correct += (logits.argmax(1) == labels).sum().item<double>();
  }
  const double n = double(std::max<std::int64_t>(set.size(), 1));
  return {loss / n, correct / n};
}

enum class method { full, lora, adalora, svd_fixed_rank };

inline const char* method_name(method m) {
  switch (m) {
    case method::full: return "full";
    case method::lora: return "lora";
    case method::adalora: return "adalora";
    default: return "svd_fixed_rank";
  }
}

/// The AdaLoRA recipe (the paper's): initial rank 1.5× the target average, cubic schedule with
/// warm-up and final phase, orthogonality regularizer 0.1, EMA coefficients 0.85.
struct adalora_recipe {
  double initial_rank_factor = 1.5;
  double tinit = 0.1, tfinal = 0.3;  ///< fractions of the steps
  std::int64_t delta_t = 10;
  double orth_weight = 0.1;
};

struct run_config {
  method kind = method::lora;
  int budget = 2;          ///< LoRA's r; AdaLoRA's target average rank
  std::vector<int> ranks;  ///< ablation: LoRA with one rank per matrix (AdaLoRA's kept ranks)
  double lr = 1e-3;
  int seed = 0;
  std::int64_t steps = 1000, batch = 32;
  double warmup = 0.06;  ///< linear warm-up fraction, then linear decay to 0
  double weight_decay = 0.01;
  std::int64_t curve_points = 5;  ///< validation-subset evaluations along the run
  adalora_recipe ada;
  /// AdaLoRA: drop the pruned triplets once the pattern is final (PEFT's force mask at T − tfinal).
  bool compact = false;

  std::int64_t initial_rank() const {
    return kind == method::adalora ? std::int64_t(std::lround(ada.initial_rank_factor * budget))
                                   : budget;
  }
  std::string label() const {
    if (kind == method::full) return "full fine-tuning";
    if (kind == method::lora) return ranks.empty() ? "LoRA" : "LoRA at AdaLoRA's ranks";
    if (kind == method::adalora)
      return std::string("AdaLoRA") + (compact ? ", compacted" : "") +
             (ada.orth_weight == 0 ? ", no orthogonality" : "");
    return "SVD form, no pruning";
  }
};

struct run_result {
  run_config config;
  std::vector<std::pair<std::int64_t, double>> curve;  ///< (step, validation-subset loss)
  evaluation validation, test;
  std::vector<int> ranks;  ///< final rank per adapted matrix (LoRA: its r)
  std::int64_t trainable = 0;
  double seconds = 0;
  /// AdaLoRA: the trained model and head, kept for the PEFT export of one run.
  std::shared_ptr<encoder> model;
  torch::Tensor head_w, head_b;
  std::optional<adalora::rank_pattern> pattern;
  /// AdaLoRA: the step time (ms, median) after the first step of the final phase, and with
  /// compaction the step that compacted and the ranks it left.
  std::int64_t compacted_at = -1;
  double final_phase_step_ms = 0;
  std::vector<int> compacted_ranks;
};

inline void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

inline std::vector<std::string> adapter_names(encoder& model) {
  std::vector<std::string> names;
  for (const adapted_linear* a : model.adapted()) names.push_back(a->name);
  return names;
}

/// Trains one arm from the pre-trained base. `keep_model` keeps the trained model in the result.
inline run_result fine_tune(const run_config& c, const encoder& pretrained, const labelled_set& train,
                            const labelled_set& validation_subset, const labelled_set& validation,
                            const labelled_set& test, std::int64_t classes, bool keep_model = false) {
  const auto start = std::chrono::steady_clock::now();
  run_result result;
  result.config = c;
  auto model = std::make_shared<encoder>(pretrained);  // copies the handles; cloned next
  for (auto& [name, t] : model->named_base()) *t = t->detach().clone();
  const bool full = c.kind == method::full;
  model->set_base_trainable(full);
  const std::uint64_t seed = 1000003ULL * std::uint64_t(c.seed + 1);
  torch::Generator gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);

  // The head: the same initialisation for every arm of a seed (torch's Linear default).
  const double bound = 1.0 / std::sqrt(double(pretrained.config().width));
  torch::Tensor head_w =
      ((torch::rand({classes, pretrained.config().width}, gen) * 2 - 1) * bound).requires_grad_();
  torch::Tensor head_b = ((torch::rand({classes}, gen) * 2 - 1) * bound).requires_grad_();

  std::vector<torch::Tensor> params = {head_w, head_b};
  if (full) {
    for (auto& p : model->base_parameters()) params.push_back(p);
  } else if (c.kind == method::lora) {
    const auto all = model->adapted();
    for (std::size_t i = 0; i < all.size(); ++i) {
      const std::int64_t r = c.ranks.empty() ? c.budget : c.ranks[i];
      if (r > 0) all[i]->attach(adapter_kind::lora, r, double(r), gen);
    }
  } else {
    const std::int64_t r = c.kind == method::adalora ? c.initial_rank() : c.budget;
    model->attach_adapters(adapter_kind::adalora, r, double(r), seed + 17);
  }
  for (adapted_linear* a : model->adapted())
    for (auto& p : a->adapter_parameters()) params.push_back(p);
  for (const auto& p : params) result.trainable += p.numel();

  // The SVD forms: one named set of views of every adapter and its .grad() for the whole run
  // (each .grad() made now, cleared in place below), the regularizer and, for AdaLoRA, the
  // allocator.
  const bool svd_form = c.kind == method::adalora || c.kind == method::svd_fixed_rank;
  adalora::adapter_set<float> set;
  std::unique_ptr<adalora::rank_allocator<float>> allocator;
  adalora::orthogonality_regularizer<float> orth({.weight = c.ada.orth_weight});
  if (svd_form) {
    for (adapted_linear* a : model->adapted()) {
      for (auto* p : {&a->A, &a->E, &a->B}) p->mutable_grad() = torch::zeros_like(*p);
      adalora::add_torch_adapter(set, a->name, a->A, a->E, a->B);
    }
  }
  if (c.kind == method::adalora) {
    const auto frac = [&](double f) { return std::int64_t(std::llround(f * double(c.steps))); };
    allocator = std::make_unique<adalora::rank_allocator<float>>(
        set, adalora::cubic_schedule({.target_budget = c.budget * std::int64_t(set.size()),
                                      .total_step = c.steps,
                                      .tinit = frac(c.ada.tinit),
                                      .tfinal = frac(c.ada.tfinal),
                                      .delta_t = c.ada.delta_t}));
  }

  torch::optim::AdamW optimizer(
      params, torch::optim::AdamWOptions(c.lr).weight_decay(c.weight_decay));
  // The batches: a permutation of the training set per seed, the same for every arm.
  std::mt19937_64 order_rng(std::uint64_t(c.seed) * 7919 + 1);
  std::vector<std::int64_t> order(static_cast<std::size_t>(train.size()));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), order_rng);
  std::size_t cursor = 0;
  const std::int64_t warmup = std::max<std::int64_t>(1, std::llround(c.warmup * double(c.steps)));
  const std::int64_t curve_every = std::max<std::int64_t>(1, c.steps / std::max<std::int64_t>(1, c.curve_points));

  const std::int64_t final_start = allocator ? allocator->schedule().final_phase_start() : -1;
  std::vector<double> final_ms;
  for (std::int64_t t = 0; t < c.steps; ++t) {
    const auto step_start = std::chrono::steady_clock::now();
    if (cursor + static_cast<std::size_t>(c.batch) > order.size()) {
      std::shuffle(order.begin(), order.end(), order_rng);
      cursor = 0;
    }
    const std::vector<std::int64_t> rows(order.begin() + static_cast<std::ptrdiff_t>(cursor),
                                         order.begin() + static_cast<std::ptrdiff_t>(cursor + static_cast<std::size_t>(c.batch)));
    cursor += static_cast<std::size_t>(c.batch);
    const auto [ids, labels] = batch_of(train, rows);
    set_lr(optimizer, c.lr * (t < warmup ? double(t + 1) / double(warmup)
                                         : double(c.steps - t) / double(c.steps - warmup + 1)));
    const torch::Tensor loss =
        torch::cross_entropy_loss(torch::linear(model->pooled(ids), head_w, head_b), labels);
    loss.backward();
    if (svd_form) orth.value_and_gradient(set);  // adds ∂R/∂A, ∂R/∂B into .grad()
    optimizer.step();
    if (allocator) allocator->step(t, set);  // after the update, before the gradients are cleared
    if (c.compact && allocator && result.compacted_at < 0 && allocator->pattern_final()) {
      result.pattern = allocator->pattern();  // of the initial ranks: what PEFT's export names
      const adalora::rank_change change = compact_adapters(model->adapted(), *allocator, set, optimizer);
      for (const auto& m : change) result.compacted_ranks.push_back(int(m.new_rank()));
      result.compacted_at = t;
    }
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad().zero_();  // in place: the set views them
    if (final_start >= 0 && t > final_start)
      final_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - step_start).count());
    if ((t + 1) % curve_every == 0 || t + 1 == c.steps)
      result.curve.emplace_back(t + 1, evaluate(*model, head_w, head_b, validation_subset).loss);
  }
  result.validation = evaluate(*model, head_w, head_b, validation);
  result.test = evaluate(*model, head_w, head_b, test);

  const std::vector<adapted_linear*> adapted = model->adapted();
  for (std::size_t i = 0; i < adapted.size(); ++i) {
    const adapted_linear* a = adapted[i];
    if (c.kind == method::full) result.ranks.push_back(0);
    else if (c.kind == method::lora) result.ranks.push_back(a->A.defined() ? int(a->A.size(0)) : 0);
    else if (allocator) result.ranks.push_back(int(allocator->last_result().kept[i]));
    else result.ranks.push_back(int(a->A.size(0)));
  }
  if (allocator) {
    // What AdaLoRA ends up training: the kept triplets (PEFT's parameter count after resizing).
    result.trainable = head_w.numel() + head_b.numel();
    for (std::size_t i = 0; i < adapted.size(); ++i)
      result.trainable += std::int64_t(result.ranks[i]) * (adapted[i]->W.size(0) + adapted[i]->W.size(1) + 1);
    if (!result.pattern) result.pattern = allocator->pattern();
    if (!final_ms.empty()) {
      std::sort(final_ms.begin(), final_ms.end());
      const std::size_t n = final_ms.size();
      result.final_phase_step_ms = n % 2 ? final_ms[n / 2] : 0.5 * (final_ms[n / 2 - 1] + final_ms[n / 2]);
    }
  }
  if (keep_model) {
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    result.model = model;
    result.head_w = head_w.detach();
    result.head_b = head_b.detach();
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace transformer
