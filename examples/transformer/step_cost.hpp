#pragma once
// What a training step costs: four models of the same architecture trained side by side in one
// process, one step each in turn on the same batch, so that the machine's load and the cache
// state fall on all of them alike:
//   lora        LoRA at the target rank r
//   lora_rinit  LoRA at AdaLoRA's initial rank (separates the cost of the larger rank from the
//               cost of what is adaptive)
//   adalora     AdaLoRA through this library: the regularizer's analytic gradient added into
//               .grad(), the allocator after optimizer.step()
//   peft_style  AdaLoRA as PEFT writes it: the regularizer as torch operations inside the loss
//               (autograd differentiates it), the allocator as per-tensor torch operations
// Each phase is timed with a steady clock; the report gives medians over the measured steps.
//
// The final phase, with and without compaction (measure_final_phase_cost): AdaLoRA masked, the
// same AdaLoRA compacted to its kept triplets once the pattern is final (compaction.hpp), and the
// same model with rank-0 adapters, which costs everything that does not depend on the rank (the
// frozen base's forward and backward, the head, each adapter operation's fixed overhead). A
// step's cost minus the rank-0 step's is the adapter's own cost; compaction should bring it
// close to the kept fraction of the masked one's.

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "examples/transformer/compaction.hpp"
#include "examples/transformer/model.hpp"
#include "examples/transformer/peft_style_allocator.hpp"
#include "examples/transformer/training.hpp"

namespace transformer {

struct phase_times {
  std::vector<double> forward_backward, regularizer, optimizer, allocator, total;  // ms per step
};

struct step_cost_result {
  int budget = 0;
  std::int64_t initial_rank = 0, steps = 0, schedule_steps = 0;
  phase_times lora, lora_rinit, adalora, peft_style;
};

/// The final phase's cost at one budget (measure_final_phase_cost).
struct final_phase_cost_result {
  int budget = 0;
  std::int64_t initial_rank = 0;  ///< per matrix
  std::int64_t initial_total = 0, kept_total = 0;  ///< triplets over all matrices
  std::int64_t steps = 0, untimed = 0;
  phase_times rank0, masked, compacted;
  double compaction_ms = 0;
  double kept_fraction() const { return initial_total ? double(kept_total) / double(initial_total) : 0; }
};

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (const double x : v) s += x;
  return v.empty() ? 0 : s / double(v.size());
}

/// PEFT's orthogonality regularizer as torch operations (AdaLoraModel.forward): the mean over
/// every lora_A and lora_B of ||P·Pᵀ − I||_F (A) or ||Pᵀ·P − I||_F (B).
inline torch::Tensor peft_orthogonality(encoder& model) {
  torch::Tensor sum = torch::zeros({});
  std::int64_t n = 0;
  for (const adapted_linear* a : model.adapted()) {
    const auto r = a->A.size(0);
    const torch::Tensor I = torch::eye(r);
    sum = sum + torch::norm(torch::mm(a->A, a->A.t()) - I) + torch::norm(torch::mm(a->B.t(), a->B) - I);
    n += 2;
  }
  return sum / double(n);
}

/// One timed model: a copy of the pre-trained encoder (frozen) with adapters of one kind and
/// rank, a zero classifier head, and AdamW over the head and the adapters, whose gradients exist
/// (zero) from the start so that every timed step does the same work.
struct timed_model {
  std::shared_ptr<encoder> model;
  torch::Tensor head_w, head_b;
  std::vector<torch::Tensor> params;
  std::unique_ptr<torch::optim::AdamW> optimizer;
};

inline timed_model make_timed_model(const encoder& pretrained, std::int64_t classes, adapter_kind kind,
                                    std::int64_t r) {
  timed_model a;
  a.model = std::make_shared<encoder>(pretrained);
  a.model->set_base_trainable(false);
  a.model->attach_adapters(kind, r, double(r), 42);
  a.head_w = torch::zeros({classes, pretrained.config().width}).requires_grad_();
  a.head_b = torch::zeros({classes}).requires_grad_();
  a.params = {a.head_w, a.head_b};
  for (adapted_linear* l : a.model->adapted())
    for (auto& p : l->adapter_parameters()) a.params.push_back(p);
  for (auto& p : a.params) p.mutable_grad() = torch::zeros_like(p);
  a.optimizer = std::make_unique<torch::optim::AdamW>(a.params, torch::optim::AdamWOptions(1e-3));
  return a;
}

/// Milliseconds from a to b.
inline double ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

/// Runs `steps` alternating steps (after `warmup` untimed ones) of the four models at `budget`.
/// The allocators follow a cubic schedule over `schedule_steps` steps with AdaLoRA's recipe, so
/// the measured steps cover its warm-up and the start of its reduction (importance updated at
/// every step, a mask every delta_t steps).
inline step_cost_result measure_step_cost(const encoder& pretrained, const labelled_set& train,
                                          std::int64_t classes, int budget, std::int64_t steps,
                                          std::int64_t warmup, std::int64_t schedule_steps,
                                          std::int64_t batch, const adalora_recipe& recipe) {
  using clock = std::chrono::steady_clock;
  step_cost_result out;
  out.budget = budget;
  out.initial_rank = std::llround(recipe.initial_rank_factor * budget);
  out.steps = steps;
  out.schedule_steps = schedule_steps;

  using arm = timed_model;
  const auto make = [&](adapter_kind kind, std::int64_t r) {
    return make_timed_model(pretrained, classes, kind, r);
  };
  arm lora = make(adapter_kind::lora, budget);
  arm lora_rinit = make(adapter_kind::lora, out.initial_rank);
  arm ours = make(adapter_kind::adalora, out.initial_rank);
  arm peft = make(adapter_kind::adalora, out.initial_rank);

  const auto frac = [&](double f) { return std::int64_t(std::llround(f * double(schedule_steps))); };
  const adalora::schedule_options schedule{.target_budget = budget * std::int64_t(ours.model->adapted().size()),
                                           .total_step = schedule_steps,
                                           .tinit = frac(recipe.tinit),
                                           .tfinal = frac(recipe.tfinal),
                                           .delta_t = recipe.delta_t};
  adalora::adapter_set<float> set;
  for (adapted_linear* l : ours.model->adapted()) adalora::add_torch_adapter(set, l->name, l->A, l->E, l->B);
  adalora::orthogonality_regularizer<float> orth({.weight = recipe.orth_weight});
  adalora::rank_allocator<float> allocator(set, adalora::cubic_schedule(schedule));

  std::vector<peft_style_allocator::module> modules;
  for (adapted_linear* l : peft.model->adapted()) modules.push_back({l->name, l->A, l->E, l->B});
  peft_style_allocator peft_allocator(
      {.init_r = out.initial_rank,
       .target_budget = schedule.target_budget,
       .tinit = schedule.tinit,
       .tfinal = schedule.tfinal,
       .delta_t = schedule.delta_t,
       .total_step = schedule.total_step},
      std::move(modules));

  std::mt19937_64 rng(5);
  std::uniform_int_distribution<std::int64_t> pick(0, train.size() - 1);
  for (std::int64_t t = 0; t < warmup + steps; ++t) {
    std::vector<std::int64_t> rows(static_cast<std::size_t>(batch));
    for (auto& r : rows) r = pick(rng);
    const auto [ids, labels] = batch_of(train, rows);
    const bool timed = t >= warmup;
    const auto ce = [&](arm& a) {
      return torch::cross_entropy_loss(torch::linear(a.model->pooled(ids), a.head_w, a.head_b), labels);
    };
    const auto clear = [](arm& a) {
      for (auto& p : a.params) p.mutable_grad().zero_();
    };
    const auto plain_lora = [&](arm& a, phase_times& times) {
      const auto t0 = clock::now();
      ce(a).backward();
      const auto t1 = clock::now();
      a.optimizer->step();
      const auto t2 = clock::now();
      clear(a);
      if (timed) {
        times.forward_backward.push_back(ms(t0, t1));
        times.optimizer.push_back(ms(t1, t2));
        times.regularizer.push_back(0);
        times.allocator.push_back(0);
        times.total.push_back(ms(t0, t2));
      }
    };
    plain_lora(lora, out.lora);
    plain_lora(lora_rinit, out.lora_rinit);
    {
      const auto t0 = clock::now();
      ce(ours).backward();
      const auto t1 = clock::now();
      orth.value_and_gradient(set);
      const auto t2 = clock::now();
      ours.optimizer->step();
      const auto t3 = clock::now();
      allocator.step(t, set);
      const auto t4 = clock::now();
      clear(ours);
      if (timed) {
        out.adalora.forward_backward.push_back(ms(t0, t1));
        out.adalora.regularizer.push_back(ms(t1, t2));
        out.adalora.optimizer.push_back(ms(t2, t3));
        out.adalora.allocator.push_back(ms(t3, t4));
        out.adalora.total.push_back(ms(t0, t4));
      }
    }
    {
      // PEFT: loss = task loss + orth_reg_weight · R, one backward() through both.
      const auto t0 = clock::now();
      const torch::Tensor task = ce(peft);
      (task + recipe.orth_weight * peft_orthogonality(*peft.model)).backward();
      const auto t2 = clock::now();
      peft.optimizer->step();
      const auto t3 = clock::now();
      peft_allocator.step(t);
      const auto t4 = clock::now();
      clear(peft);
      if (timed) {
        // The regularizer's forward and backward cannot be separated from the task's backward
        // inside one autograd pass: its share is counted in forward_backward.
        out.peft_style.forward_backward.push_back(ms(t0, t2));
        out.peft_style.regularizer.push_back(0);
        out.peft_style.optimizer.push_back(ms(t2, t3));
        out.peft_style.allocator.push_back(ms(t3, t4));
        out.peft_style.total.push_back(ms(t0, t4));
      }
    }
  }
  return out;
}

/// The final phase at `budget`: `steps` timed steps of three models in turn on the same batch,
/// after `untimed` steps that bring a short cubic schedule (warm-up a third of them, reduction to
/// the end of them, then the final phase) to its force mask. `masked` and `compacted` start from
/// the same adapters and see the same batches; `compacted` drops its pruned triplets at the force
/// mask. The schedule is compressed so that the timed steps are all in the final phase: the kept
/// pattern is not a full run's, its total is (the budget).
inline final_phase_cost_result measure_final_phase_cost(const encoder& pretrained, const labelled_set& train,
                                                        std::int64_t classes, int budget, std::int64_t steps,
                                                        std::int64_t untimed, std::int64_t batch,
                                                        const adalora_recipe& recipe) {
  using clock = std::chrono::steady_clock;
  final_phase_cost_result out;
  out.budget = budget;
  out.initial_rank = std::llround(recipe.initial_rank_factor * budget);
  out.steps = steps;
  out.untimed = untimed = std::max<std::int64_t>(untimed, 3 * recipe.delta_t);

  struct arm : timed_model {
    adalora::adapter_set<float> set;
    std::unique_ptr<adalora::rank_allocator<float>> allocator;
    bool compact = false, compacted = false;
    phase_times* times = nullptr;
  };
  const adalora::schedule_options schedule{
      .target_budget = budget * std::int64_t(pretrained.config().layers) * std::int64_t(matrix_types().size()),
      .total_step = untimed + 1 + steps,
      .tinit = untimed / 3,
      .tfinal = steps + 1,
      .delta_t = recipe.delta_t};
  const auto make = [&](std::int64_t r, bool with_allocator, bool compact, phase_times& times) {
    auto a = std::make_unique<arm>();
    static_cast<timed_model&>(*a) = make_timed_model(pretrained, classes, adapter_kind::adalora, r);
    for (adapted_linear* l : a->model->adapted()) adalora::add_torch_adapter(a->set, l->name, l->A, l->E, l->B);
    if (with_allocator)
      a->allocator = std::make_unique<adalora::rank_allocator<float>>(a->set, adalora::cubic_schedule(schedule));
    a->compact = compact;
    a->times = &times;
    return a;
  };
  auto rank0 = make(0, false, false, out.rank0);
  auto masked = make(out.initial_rank, true, false, out.masked);
  auto compacted = make(out.initial_rank, true, true, out.compacted);
  out.initial_total = masked->set.total_rank();
  adalora::orthogonality_regularizer<float> orth({.weight = recipe.orth_weight});

  std::mt19937_64 rng(9);
  std::uniform_int_distribution<std::int64_t> pick(0, train.size() - 1);
  for (std::int64_t t = 0; t < untimed + 1 + steps; ++t) {
    std::vector<std::int64_t> rows(static_cast<std::size_t>(batch));
    for (auto& r : rows) r = pick(rng);
    const auto [ids, labels] = batch_of(train, rows);
    const bool timed = t > untimed;
    const auto step = [&](arm& a) {
      const auto t0 = clock::now();
      torch::cross_entropy_loss(torch::linear(a.model->pooled(ids), a.head_w, a.head_b), labels).backward();
      const auto t1 = clock::now();
      orth.value_and_gradient(a.set);
      const auto t2 = clock::now();
      a.optimizer->step();
      const auto t3 = clock::now();
      if (a.allocator) a.allocator->step(t, a.set);
      const auto t4 = clock::now();
      if (a.compact && !a.compacted && a.allocator->pattern_final()) {
        compact_adapters(a.model->adapted(), *a.allocator, a.set, *a.optimizer);
        a.compacted = true;
        out.compaction_ms = ms(t4, clock::now());
        out.kept_total = a.allocator->total_rank();
      }
      for (auto& p : a.params) p.mutable_grad().zero_();
      if (timed) {
        a.times->forward_backward.push_back(ms(t0, t1));
        a.times->regularizer.push_back(ms(t1, t2));
        a.times->optimizer.push_back(ms(t2, t3));
        a.times->allocator.push_back(ms(t3, t4));
        a.times->total.push_back(ms(t0, t4));
      }
    };
    // The two AdaLoRA models alternate which goes first, so neither always inherits the other's
    // cache state.
    step(*rank0);
    if (t % 2) step(*masked), step(*compacted);
    else step(*compacted), step(*masked);
  }
  if (!compacted->compacted)
    throw std::logic_error("measure_final_phase_cost: the pattern never became final");
  return out;
}

}  // namespace transformer
