#pragma once
// PEFT's AdaLoRA rank allocator (peft/tuners/adalora/layer.py RankAllocator, driven as
// AdaLoraModel.update_and_allocate drives it in model.py), written the way PEFT writes it: one
// libtorch operation per step of the formula, per parameter tensor, each making a new tensor.
// It is the baseline a PEFT user pays for, timed in the same loop as adalora::rank_allocator;
// it is not part of the library. docs/algorithm.md §3–§7 gives the semantics followed here;
// peft_style_allocator_test.cpp checks that both allocators keep the same triplets, step by step.
//
// Per call of step(t), with F = total_step - tfinal (PEFT's three branches):
//   t <  F: update the EMAs of every lora_A/E/B tensor; budget_schedule(t); if it says "mask",
//           score the triplets, take the k-th smallest score (k = b0 - budget) over all modules
//           and zero E where score <= threshold; the kept pattern becomes the rank pattern.
//   t == F: no EMA update; mask to budget_schedule(F) = bT whatever delta_t says (PEFT's
//           force_mask); store the pattern; drop the EMAs (reset_ipt).
//   t >  F: zero E where the stored rank pattern says pruned (mask_using_rank_pattern).
// Everything runs under torch::NoGradGuard. Only E is written (in place, masked_fill_).

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace transformer {

/// PEFT's RankAllocator (peft/tuners/adalora/layer.py), in libtorch ops as PEFT writes it.
class peft_style_allocator {
 public:
  /// AdaLoraConfig's fields. target_budget is PEFT's target_bgt = target_r * (number of modules).
  struct options {
    std::int64_t init_r;         ///< every module's rank (lora_A.size(0)); PEFT's init_bgt is their sum
    std::int64_t target_budget;  ///< total kept rank at the end, = target_r * modules
    std::int64_t tinit;          ///< warm-up: no masking for t <= tinit
    std::int64_t tfinal;         ///< final phase length: the pattern is fixed from total_step - tfinal on
    std::int64_t delta_t;        ///< mask when t % delta_t == 0 during the reduction
    std::int64_t total_step;
    double beta1 = 0.85;         ///< sensitivity EMA
    double beta2 = 0.85;         ///< uncertainty EMA
  };

  /// One adapted layer: lora_A (r, in), lora_E (r, 1), lora_B (out, r), all requires_grad, all
  /// of one floating dtype and device. The tensors are shared with the caller (torch handles).
  struct module {
    std::string name;
    torch::Tensor A, E, B;
  };

  /// What step() did: the schedule's budget (in triplets) and whether E was masked.
  struct result {
    std::int64_t budget;
    bool masked;
  };

  /// One parameter tensor's importance state (PEFT's ipt, exp_avg_ipt, exp_avg_unc dicts).
  /// Undefined tensors before the first update and after reset_ipt().
  struct importance {
    torch::Tensor ipt, exp_avg_ipt, exp_avg_unc;
  };
  enum class part : std::size_t { A = 0, E = 1, B = 2 };

  /// Throws std::invalid_argument for options PEFT refuses (total_step <= 0, tinit >= total_step
  /// - tfinal, beta outside (0, 1)), for ones that make torch.kthvalue fail at a mask event
  /// (target_budget >= the sum of the ranks, delta_t < 1, negative tinit/tfinal/target_budget),
  /// and for tensors whose shapes are not lora_A (init_r, in), lora_E (init_r, 1), lora_B (out, init_r).
  peft_style_allocator(options o, std::vector<module> modules)
      : o_(o), modules_(std::move(modules)), state_(modules_.size()) {
    require(!modules_.empty(), "needs at least one module");
    require(o_.total_step > 0, "total_step must be > 0");
    require(o_.tinit >= 0 && o_.tfinal >= 0, "tinit and tfinal must be >= 0");
    require(o_.delta_t >= 1, "delta_t must be >= 1");
    require(o_.tinit < o_.total_step - o_.tfinal,
            "tinit must be < total_step - tfinal (PEFT: a budgeting phase is required)");
    require(o_.beta1 > 0.0 && o_.beta1 < 1.0 && o_.beta2 > 0.0 && o_.beta2 < 1.0,
            "beta1 and beta2 must be in (0, 1)");
    for (const module& m : modules_) {
      for (const torch::Tensor* t : {&m.A, &m.E, &m.B})
        require(t->defined() && t->dim() == 2 && t->is_floating_point(),
                "module '" + m.name + "': lora_A, lora_E and lora_B must be 2-D floating tensors");
      const std::int64_t r = m.A.size(0);
      require(r == o_.init_r && m.E.size(0) == r && m.E.size(1) == 1 && m.B.size(1) == r,
              "module '" + m.name + "': shapes must be lora_A (init_r, in), lora_E (init_r, 1), "
              "lora_B (out, init_r) with init_r = " + std::to_string(o_.init_r));
      init_bgt_ += r;  // PEFT _set_budget_scheduler: the sum of lora_A.size(0)
      rank_pattern_.emplace_back(static_cast<std::size_t>(r), true);
    }
    require(o_.target_budget >= 0 && o_.target_budget < init_bgt_,
            "target_budget must be in [0, sum of the ranks = " + std::to_string(init_bgt_) + ")");
  }

  /// PEFT's AdaLoraModel.update_and_allocate(global_step): call after optimizer.step(), before
  /// the gradients are cleared, with global_step counting from 0 (every .grad() defined).
  result step(std::int64_t global_step) {
    torch::NoGradGuard no_grad;
    const std::int64_t freeze = o_.total_step - o_.tfinal;
    if (global_step < freeze) {
      // RankAllocator.update_and_allocate(model, global_step)
      update_ipt();
      const auto [budget, mask_ind] = budget_schedule(global_step);
      if (mask_ind) mask_to_budget(budget);
      return {budget, mask_ind};
    }
    if (global_step == freeze) {
      // RankAllocator.update_and_allocate(model, global_step, force_mask=True): no EMA update
      // (global_step is not < total_step - tfinal), budget_schedule(F) = bT, mask regardless.
      const std::int64_t budget = budget_schedule(global_step).first;
      mask_to_budget(budget);
      reset_ipt();
      return {budget, true};
    }
    mask_using_rank_pattern();
    return {budget_schedule(global_step).first, true};
  }

  /// PEFT's budget_schedule(step): (budget, mask_ind).
  std::pair<std::int64_t, bool> budget_schedule(std::int64_t step) const {
    if (step <= o_.tinit) return {init_bgt_, false};
    if (step > o_.total_step - o_.tfinal) return {o_.target_budget, true};
    // Python: 1 - (step - tinit) / (total_step - tfinal - tinit), true division in double.
    const double mul_coeff = 1.0 - static_cast<double>(step - o_.tinit) /
                                       static_cast<double>(o_.total_step - o_.tfinal - o_.tinit);
    // int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt): truncation toward zero.
    const double b = static_cast<double>(init_bgt_ - o_.target_budget) * std::pow(mul_coeff, 3.0) +
                     static_cast<double>(o_.target_budget);
    return {static_cast<std::int64_t>(b), step % o_.delta_t == 0};
  }

  /// PEFT's reset_ipt(): drops every EMA (they are re-created as zeros by the next update).
  void reset_ipt() {
    for (auto& per_module : state_)
      for (importance& s : per_module) s = importance{};
  }

  // ---- inspection ------------------------------------------------------------------------------

  const options& opts() const noexcept { return o_; }
  const std::vector<module>& modules() const noexcept { return modules_; }
  std::int64_t initial_budget() const noexcept { return init_bgt_; }  ///< PEFT's init_bgt
  std::int64_t target_budget() const noexcept { return o_.target_budget; }

  /// The rank pattern: per module, true = kept, of the last threshold mask (all true before it).
  const std::vector<std::vector<bool>>& rank_pattern() const noexcept { return rank_pattern_; }
  /// Kept triplets per module under the rank pattern.
  std::vector<std::int64_t> kept() const {
    std::vector<std::int64_t> k;
    k.reserve(rank_pattern_.size());
    for (const auto& p : rank_pattern_) {
      std::int64_t n = 0;
      for (bool b : p) n += b ? 1 : 0;
      k.push_back(n);
    }
    return k;
  }
  /// The threshold of the last threshold mask (the k-th smallest triplet score), NaN before it.
  double last_threshold() const noexcept { return last_threshold_; }
  /// The triplet scores of the last threshold mask, all modules concatenated in order (b0,).
  const torch::Tensor& last_scores() const noexcept { return last_scores_; }
  /// The importance state of one module's tensor.
  const importance& state(std::size_t m, part p) const {
    return state_.at(m)[static_cast<std::size_t>(p)];
  }

 private:
  static void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("peft_style_allocator: " + what);
  }

  std::array<const torch::Tensor*, 3> params(const module& m) const { return {&m.A, &m.E, &m.B}; }

  /// RankAllocator.update_ipt: per parameter tensor, in PEFT's order of operations.
  void update_ipt() {
    for (std::size_t m = 0; m < modules_.size(); ++m) {
      const auto ps = params(modules_[m]);
      for (std::size_t k = 0; k < 3; ++k) {
        const torch::Tensor& p = *ps[k];
        importance& s = state_[m][k];
        if (!s.ipt.defined()) {  // first call (or after reset_ipt): zeros_like(p)
          s.ipt = torch::zeros_like(p);
          s.exp_avg_ipt = torch::zeros_like(p);
          s.exp_avg_unc = torch::zeros_like(p);
        }
        require(p.grad().defined(),
                "module '" + modules_[m].name + "': a parameter has no .grad() (call after backward())");
        s.ipt = (p * p.grad()).abs().detach();
        // Sensitivity smoothing; beta and (1 - beta) are double scalars, as Python's floats.
        s.exp_avg_ipt = o_.beta1 * s.exp_avg_ipt + (1 - o_.beta1) * s.ipt;
        // Uncertainty quantification, with the new exp_avg_ipt.
        s.exp_avg_unc = o_.beta2 * s.exp_avg_unc + (1 - o_.beta2) * (s.ipt - s.exp_avg_ipt).abs();
      }
    }
  }

  /// RankAllocator._element_score.
  torch::Tensor element_score(std::size_t m, part p) const {
    const importance& s = state_[m][static_cast<std::size_t>(p)];
    require(s.exp_avg_ipt.defined(),
            "module '" + modules_[m].name + "': no importance state to score (no update yet)");
    return s.exp_avg_ipt * s.exp_avg_unc;
  }

  /// RankAllocator.mask_to_budget: triplet scores, the k-th smallest over all modules, E zeroed
  /// where score <= threshold, the rank pattern stored.
  void mask_to_budget(std::int64_t budget) {
    std::vector<torch::Tensor> triplet_ipt(modules_.size());
    std::vector<torch::Tensor> all_score;
    all_score.reserve(modules_.size());
    for (std::size_t m = 0; m < modules_.size(); ++m) {
      // A: mean over in_features, (r, 1); B: mean over out_features, viewed as (r, 1).
      const torch::Tensor ipt_A = torch::mean(element_score(m, part::A), /*dim=*/1, /*keepdim=*/true);
      const torch::Tensor ipt_B = torch::mean(element_score(m, part::B), /*dim=*/0, /*keepdim=*/false).view({-1, 1});
      const torch::Tensor ipt_E = element_score(m, part::E);
      // _combine_ipt: cat([A, B], dim=1).sum(dim=1), then E.view(-1) + that.
      const torch::Tensor ipt_AB = torch::cat({ipt_A, ipt_B}, /*dim=*/1).sum(/*dim=*/1, /*keepdim=*/false);
      const torch::Tensor sum_ipt = ipt_E.view(-1) + ipt_AB.view(-1);
      triplet_ipt[m] = sum_ipt.view({-1, 1});
      all_score.push_back(sum_ipt.view(-1));
    }
    last_scores_ = torch::cat(all_score);
    last_threshold_ = std::get<0>(torch::kthvalue(last_scores_, init_bgt_ - budget)).item<double>();
    for (std::size_t m = 0; m < modules_.size(); ++m) {
      modules_[m].E.masked_fill_(triplet_ipt[m].le(last_threshold_), 0.0);
      // rank_pattern[n] = (~(triplet_ipt[n] <= mask_threshold)).view(-1).tolist()
      const torch::Tensor keep = (~triplet_ipt[m].le(last_threshold_)).view(-1).to(torch::kCPU);
      const auto acc = keep.accessor<bool, 1>();
      std::vector<bool>& pattern = rank_pattern_[m];
      for (std::int64_t i = 0; i < acc.size(0); ++i) pattern[static_cast<std::size_t>(i)] = acc[i];
    }
  }

  /// RankAllocator.mask_using_rank_pattern: E[~pattern] = 0, the mask rebuilt from the stored
  /// bools each call (torch.Tensor(list).unsqueeze(-1).to(device), then ~mask.bool()).
  void mask_using_rank_pattern() {
    for (std::size_t m = 0; m < modules_.size(); ++m) {
      const std::vector<bool>& pattern = rank_pattern_[m];
      std::vector<float> as_float(pattern.begin(), pattern.end());
      const torch::Tensor mask =
          torch::tensor(as_float, torch::kFloat32).unsqueeze(-1).to(modules_[m].E.device());
      modules_[m].E.masked_fill_(~mask.to(torch::kBool), 0.0);
    }
  }

  options o_;
  std::vector<module> modules_;
  std::vector<std::array<importance, 3>> state_;  // per module: A, E, B
  std::int64_t init_bgt_ = 0;
  std::vector<std::vector<bool>> rank_pattern_;
  torch::Tensor last_scores_;
  double last_threshold_ = std::nan("");
};

}  // namespace transformer
