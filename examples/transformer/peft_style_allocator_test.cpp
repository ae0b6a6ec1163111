// transformer::peft_style_allocator (PEFT's RankAllocator in libtorch ops) against adalora's own
// rank_allocator<float> (through add_torch_adapter), side by side on identical tensors for whole
// schedules: the same budget and mask flag at every step, the same kept triplets per module, the
// same E bit for bit (pruned entries exactly 0), the same EMAs bit for bit, and the same
// triplet scores and thresholds up to float rounding of the means.
//
// Ties: both prune every score <= the k-th smallest, and torch's float means may differ from
// adalora's double sums in the last bits, so a near-tie at the threshold could be decided
// differently. The inputs are random normal, and the test checks at every mask event that the
// gap between the k-th and (k+1)-th smallest score is far above rounding (relative 1e-5): the
// comparison is exact because the inputs are well separated, and it says so if they are not.
//
// Only REQUIRE here, never Catch's CHECK: Debian's libtorch pulls in glog, whose CHECK macro
// replaces Catch's after <torch/torch.h> and would need -lglog.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "adalora/adapter_set.hpp"
#include "adalora/budget_schedule.hpp"
#include "adalora/importance/metric.hpp"
#include "adalora/importance/smoothed_sensitivity.hpp"
#include "adalora/integrations/torch.hpp"
#include "adalora/rank_allocator.hpp"
#include "examples/transformer/peft_style_allocator.hpp"

namespace {

using transformer::peft_style_allocator;

struct scenario {
  std::int64_t total_step, tinit, tfinal, delta_t;
  double beta1, beta2;
  std::int64_t extra_steps;  // run to total_step + extra_steps (past the end, as a loop may)
  std::uint64_t seed;
};

constexpr std::int64_t rank = 6, target_r = 2;
const std::vector<std::pair<std::int64_t, std::int64_t>> in_out = {{8, 12}, {16, 8}, {24, 20}, {12, 24}};

/// adalora's state of one tensor: {exp_avg_ipt, exp_avg_unc} interleaved per element, row-major.
std::pair<torch::Tensor, torch::Tensor> adalora_state(const adalora::rank_allocator<float>& alloc,
                                                      std::size_t m, adalora::tensor_role role,
                                                      const torch::Tensor& like) {
  const auto s = alloc.state(m, role);
  const auto all = torch::from_blob(const_cast<float*>(s.data()),
                                    {static_cast<std::int64_t>(s.size() / 2), 2}, torch::kFloat32);
  return {all.select(1, 0).reshape(like.sizes()).clone(), all.select(1, 1).reshape(like.sizes()).clone()};
}

double relative(double a, double b) { return std::abs(a - b) / std::max({std::abs(a), std::abs(b), 1e-300}); }

void run_side_by_side(const scenario& sc) {
  INFO("scenario: total_step " << sc.total_step << ", tinit " << sc.tinit << ", tfinal " << sc.tfinal
                               << ", delta_t " << sc.delta_t << ", beta " << sc.beta1 << "/" << sc.beta2);
  torch::manual_seed(sc.seed);
  const std::size_t n = in_out.size();
  const std::int64_t b0 = rank * static_cast<std::int64_t>(n), bT = target_r * static_cast<std::int64_t>(n);
  const std::int64_t freeze = sc.total_step - sc.tfinal;
  const float lr = 0.05f;

  // Two identical copies of every adapter: one for each allocator.
  std::vector<peft_style_allocator::module> peft_modules;
  std::vector<torch::Tensor> peft_params, ada_params;  // A, E, B per module
  adalora::adapter_set<float> set;
  for (std::size_t m = 0; m < n; ++m) {
    const auto [in, out] = in_out[m];
    const torch::Tensor A = torch::randn({rank, in}), E = torch::randn({rank, 1}), B = torch::randn({out, rank});
    peft_style_allocator::module pm{"layer" + std::to_string(m), A.clone().requires_grad_(),
                                    E.clone().requires_grad_(), B.clone().requires_grad_()};
    std::vector<torch::Tensor> am = {A.clone().requires_grad_(), E.clone().requires_grad_(),
                                     B.clone().requires_grad_()};
    for (auto* p : {&pm.A, &pm.E, &pm.B}) p->mutable_grad() = torch::zeros_like(*p);
    for (auto& p : am) p.mutable_grad() = torch::zeros_like(p);
    adalora::add_torch_adapter(set, pm.name, am[0], am[1], am[2]);
    peft_params.insert(peft_params.end(), {pm.A, pm.E, pm.B});
    ada_params.insert(ada_params.end(), am.begin(), am.end());
    peft_modules.push_back(std::move(pm));
  }

  peft_style_allocator peft({.init_r = rank,
                             .target_budget = bT,
                             .tinit = sc.tinit,
                             .tfinal = sc.tfinal,
                             .delta_t = sc.delta_t,
                             .total_step = sc.total_step,
                             .beta1 = sc.beta1,
                             .beta2 = sc.beta2},
                            peft_modules);
  adalora::rank_allocator<float> ada(
      set,
      adalora::cubic_schedule({.target_budget = bT, .total_step = sc.total_step, .tinit = sc.tinit,
                               .tfinal = sc.tfinal, .delta_t = sc.delta_t}),
      adalora::smoothed_sensitivity({.beta1 = sc.beta1, .beta2 = sc.beta2}));
  REQUIRE(peft.initial_budget() == b0);
  REQUIRE(ada.initial_budget() == b0);

  int threshold_events = 0, pattern_changes = 0, revived = 0;
  std::vector<std::vector<bool>> previous = peft.rank_pattern(), frozen;
  for (std::int64_t t = 0; t < sc.total_step + sc.extra_steps; ++t) {
    INFO("step " << t);
    {
      // The gradients of this step, then a plain SGD step on both copies with the same ops: the
      // allocator sees w_{t+1} and g_t (docs/algorithm.md §3), and pruned E entries move again.
      torch::NoGradGuard no_grad;
      for (std::size_t i = 0; i < peft_params.size(); ++i) {
        const torch::Tensor g = torch::randn(peft_params[i].sizes());
        peft_params[i].mutable_grad().copy_(g);
        ada_params[i].mutable_grad().copy_(g);
        peft_params[i].add_(g, -lr);
        ada_params[i].add_(g, -lr);
      }
    }

    const auto pr = peft.step(t);
    const auto& ar = ada.step(t, set);

    REQUIRE(pr.budget == ar.budget);
    REQUIRE(pr.masked == (ar.action != adalora::mask_action::none));
    REQUIRE(ar.importance_updated == (t < freeze));
    REQUIRE(ar.forced == (t == freeze));
    if (t == freeze) REQUIRE(ar.action == adalora::mask_action::threshold);
    if (t > freeze) REQUIRE(ar.action == adalora::mask_action::pattern);

    if (ar.action == adalora::mask_action::threshold) {
      ++threshold_events;
      // Precondition of an exact comparison: no near-tie at the threshold.
      const torch::Tensor sorted = std::get<0>(peft.last_scores().to(torch::kFloat64).sort());
      const std::int64_t k = b0 - pr.budget;
      REQUIRE(k >= 1);
      REQUIRE(k < b0);
      const double below = sorted[k - 1].item<double>(), above = sorted[k].item<double>();
      INFO("k-th smallest " << below << ", next " << above);
      REQUIRE(relative(below, above) > 1e-5);

      REQUIRE(relative(peft.last_threshold(), ar.threshold) < 1e-6);
      const auto ada_scores = ada.triplet_scores();
      for (std::int64_t i = 0; i < b0; ++i) {
        INFO("triplet " << i);
        REQUIRE(relative(peft.last_scores()[i].item<double>(), ada_scores[static_cast<std::size_t>(i)]) < 1e-5);
      }
    }

    // The kept pattern per module, and E bit for bit, pruned entries exactly 0.
    const auto kept = peft.kept();
    std::int64_t kept_total = 0;
    for (std::size_t m = 0; m < n; ++m) {
      INFO("module " << m);
      const auto mask = ada.kept_mask(m);
      const std::vector<bool>& pattern = peft.rank_pattern()[m];
      REQUIRE(std::vector<bool>(mask.begin(), mask.end()) == pattern);
      REQUIRE(kept[m] == ar.kept[m]);
      kept_total += kept[m];
      REQUIRE(torch::equal(peft_modules[m].E, ada_params[3 * m + 1]));
      if (pr.masked)
        for (std::int64_t i = 0; i < rank; ++i)
          if (!pattern[static_cast<std::size_t>(i)]) REQUIRE(peft_modules[m].E[i][0].item<float>() == 0.0f);
    }
    if (pr.masked) REQUIRE(kept_total <= pr.budget);
    if (ar.action == adalora::mask_action::threshold) REQUIRE(kept_total == pr.budget);  // no ties

    // Soft masking during the reduction: patterns change, pruned triplets come back.
    if (peft.rank_pattern() != previous) {
      ++pattern_changes;
      for (std::size_t m = 0; m < n; ++m)
        for (std::size_t i = 0; i < static_cast<std::size_t>(rank); ++i)
          revived += (!previous[m][i] && peft.rank_pattern()[m][i]) ? 1 : 0;
    }
    previous = peft.rank_pattern();

    // The EMAs, bit for bit, while they are updated; both dropped by the force mask.
    for (std::size_t m = 0; m < n; ++m) {
      const std::pair<peft_style_allocator::part, adalora::tensor_role> roles[] = {
          {peft_style_allocator::part::A, adalora::tensor_role::A},
          {peft_style_allocator::part::E, adalora::tensor_role::E},
          {peft_style_allocator::part::B, adalora::tensor_role::B}};
      for (const auto& [part, role] : roles) {
        INFO("module " << m << ", tensor " << static_cast<int>(role));
        const auto& s = peft.state(m, part);
        const auto [ema, unc] = adalora_state(ada, m, role, peft_params[3 * m + static_cast<std::size_t>(part)]);
        if (t < freeze) {
          REQUIRE(torch::equal(s.exp_avg_ipt, ema));
          REQUIRE(torch::equal(s.exp_avg_unc, unc));
        } else {
          REQUIRE_FALSE(s.exp_avg_ipt.defined());
          REQUIRE(ema.eq(0).all().item<bool>());
          REQUIRE(unc.eq(0).all().item<bool>());
        }
      }
    }

    // From the force mask on, the pattern is fixed and keeps exactly bT triplets.
    if (t == freeze) frozen = peft.rank_pattern();
    if (t >= freeze) {
      REQUIRE(peft.rank_pattern() == frozen);
      REQUIRE(kept_total == bT);
    }
  }
  // The run exercised the reduction (several re-scorings, soft masking) and the final phase.
  REQUIRE(threshold_events >= 5);
  REQUIRE(pattern_changes >= 3);
  REQUIRE(revived >= 1);
  REQUIRE(sc.total_step + sc.extra_steps > freeze + 1);
}

}  // namespace

TEST_CASE("peft_style_allocator: PEFT's budget_schedule is adalora's cubic_schedule", "[peft_style][libtorch]") {
  const std::int64_t n = 4;
  for (const auto& [T, tinit, tfinal, dt] : std::vector<std::array<std::int64_t, 4>>{
           {60, 5, 10, 3}, {50, 4, 7, 3}, {40, 3, 0, 5}, {1000, 100, 250, 10}, {7, 0, 0, 1}, {100, 0, 99, 2}}) {
    INFO("T " << T << ", tinit " << tinit << ", tfinal " << tfinal << ", delta_t " << dt);
    std::vector<peft_style_allocator::module> modules;
    for (std::int64_t m = 0; m < n; ++m)
      modules.push_back({"m" + std::to_string(m), torch::zeros({12, 5}), torch::zeros({12, 1}), torch::zeros({7, 12})});
    for (const std::int64_t target_r : {0, 1, 8, 11}) {
      const peft_style_allocator peft({.init_r = 12, .target_budget = target_r * n, .tinit = tinit,
                                       .tfinal = tfinal, .delta_t = dt, .total_step = T},
                                      modules);
      const auto schedule = adalora::cubic_schedule({.target_budget = target_r * n, .total_step = T,
                                                     .tinit = tinit, .tfinal = tfinal, .delta_t = dt})
                                .with_initial_budget(12 * n);
      for (std::int64_t t = 0; t < T + 5; ++t) {
        const auto [budget, mask] = peft.budget_schedule(t);
        const auto d = schedule.at(t);
        INFO("target_r " << target_r << ", step " << t);
        REQUIRE(budget == d.budget);
        REQUIRE(mask == d.mask);
      }
    }
  }
}

TEST_CASE("peft_style_allocator: same choices as adalora::rank_allocator, step by step", "[peft_style][libtorch]") {
  // Force mask at T - tfinal = 50, not a multiple of delta_t (where loralib would not mask).
  SECTION("T 60, tinit 5, tfinal 10, delta_t 3") { run_side_by_side({60, 5, 10, 3, 0.85, 0.85, 2, 1}); }
  // PEFT's example of the difference to loralib, other betas.
  SECTION("T 50, tinit 4, tfinal 7, delta_t 3, betas 0.8 / 0.9") { run_side_by_side({50, 4, 7, 3, 0.8, 0.9, 2, 2}); }
  // tfinal 0 (PEFT's default): the force mask comes at t = T, only for a loop that runs past T.
  SECTION("T 40, tinit 3, tfinal 0, delta_t 5") { run_side_by_side({40, 3, 0, 5, 0.85, 0.85, 4, 3}); }
}

TEST_CASE("peft_style_allocator: refuses what PEFT refuses and what breaks kthvalue", "[peft_style][libtorch]") {
  auto modules = [] {
    return std::vector<peft_style_allocator::module>{
        {"m", torch::zeros({4, 3}), torch::zeros({4, 1}), torch::zeros({5, 4})}};
  };
  const peft_style_allocator::options good{.init_r = 4, .target_budget = 2, .tinit = 1, .tfinal = 2,
                                           .delta_t = 1, .total_step = 10};
  REQUIRE_NOTHROW(peft_style_allocator(good, modules()));
  auto bad = good;
  bad.tinit = 8;  // tinit >= total_step - tfinal
  REQUIRE_THROWS_AS(peft_style_allocator(bad, modules()), std::invalid_argument);
  bad = good;
  bad.target_budget = 4;  // k = 0 at every mask event
  REQUIRE_THROWS_AS(peft_style_allocator(bad, modules()), std::invalid_argument);
  bad = good;
  bad.beta2 = 1.0;
  REQUIRE_THROWS_AS(peft_style_allocator(bad, modules()), std::invalid_argument);
  bad = good;
  bad.init_r = 5;  // lora_A has 4 rows
  REQUIRE_THROWS_AS(peft_style_allocator(bad, modules()), std::invalid_argument);
  auto wrong_b = modules();
  wrong_b[0].B = torch::zeros({5, 3});
  REQUIRE_THROWS_AS(peft_style_allocator(good, wrong_b), std::invalid_argument);
}
