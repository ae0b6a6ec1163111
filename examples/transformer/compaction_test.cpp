// Compaction of torch-held adapters (compaction.hpp): what moves where, rank 0, refusals, and
// training after compaction against masked training with the orthogonality regularizer off.
//
// Only REQUIRE here, never Catch's CHECK: Debian's libtorch pulls in glog, whose CHECK macro
// replaces Catch's after <torch/torch.h>.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/integrations/torch.hpp"
#include "examples/transformer/compaction.hpp"
#include "examples/transformer/model.hpp"

using namespace transformer;

namespace {

adapted_linear make_adapter(std::int64_t out, std::int64_t in, std::int64_t r, std::uint64_t seed,
                            const std::string& name = "m") {
  torch::Generator gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);
  adapted_linear a;
  a.name = name;
  a.W = torch::randn({out, in}, gen);
  a.b = torch::randn({out}, gen);
  a.attach(adapter_kind::adalora, r, double(r), gen);
  torch::NoGradGuard no_grad;
  a.E.copy_(torch::randn({r, 1}, gen));  // E = 0 at attach: give the triplets different values
  for (auto* p : {&a.A, &a.E, &a.B}) p->mutable_grad() = torch::zeros_like(*p);
  return a;
}

torch::optim::AdamWParamState& state_of(torch::optim::Optimizer& opt, const torch::Tensor& p) {
  auto& s = opt.state().at(c10::guts::to_string(p.unsafeGetTensorImpl()));
  return static_cast<torch::optim::AdamWParamState&>(*s);
}

void one_step(adapted_linear& a, torch::optim::Optimizer& opt, const torch::Tensor& x) {
  a.forward(x).pow(2).sum().backward();
  opt.step();
}

}  // namespace

TEST_CASE("compact_adapter gathers A, E, B, their gradients and AdamW's moments in place", "[compaction]") {
  torch::manual_seed(1);
  adapted_linear a = make_adapter(5, 4, 3, 11);
  torch::optim::AdamW opt(std::vector<torch::Tensor>{a.A, a.E, a.B}, torch::optim::AdamWOptions(1e-2));
  const torch::Tensor x = torch::randn({6, 4});
  one_step(a, opt, x);
  {
    torch::NoGradGuard no_grad;
    a.E[1].zero_();  // what the allocator's mask does to the pruned triplet
  }
  const torch::Tensor y_masked = a.forward(x).detach();
  const torch::Tensor A0 = a.A.detach().clone(), E0 = a.E.detach().clone(), B0 = a.B.detach().clone();
  const torch::Tensor gA0 = a.A.grad().clone(), gB0 = a.B.grad().clone();
  const torch::Tensor mA0 = state_of(opt, a.A).exp_avg().clone();
  const torch::Tensor vB0 = state_of(opt, a.B).exp_avg_sq().clone();
  const torch::Tensor handle = opt.param_groups()[0].params()[0];  // the optimizer's own handle of A

  compact_adapter(a, adalora::triplet_map::keeping(std::vector<bool>{true, false, true}), opt);

  REQUIRE(a.A.sizes() == torch::IntArrayRef({2, 4}));
  REQUIRE(a.E.sizes() == torch::IntArrayRef({2, 1}));
  REQUIRE(a.B.sizes() == torch::IntArrayRef({5, 2}));
  REQUIRE(handle.sizes() == torch::IntArrayRef({2, 4}));  // the same tensor, not a copy
  REQUIRE(a.A.requires_grad());
  // Kept triplets 0 and 2, in order.
  REQUIRE(torch::equal(a.A[0], A0[0]));
  REQUIRE(torch::equal(a.A[1], A0[2]));
  REQUIRE(torch::equal(a.E[1], E0[2]));
  REQUIRE(torch::equal(a.B.select(1, 1), B0.select(1, 2)));
  REQUIRE(torch::equal(a.A.grad()[1], gA0[2]));
  REQUIRE(torch::equal(a.B.grad().select(1, 0), gB0.select(1, 0)));
  REQUIRE(torch::equal(state_of(opt, a.A).exp_avg()[1], mA0[2]));
  REQUIRE(torch::equal(state_of(opt, a.B).exp_avg_sq().select(1, 1), vB0.select(1, 2)));
  // The function is unchanged: the dropped triplet had E = 0.
  REQUIRE(torch::allclose(a.forward(x), y_masked, 1e-6, 1e-6));
  // Training goes on at the new rank.
  for (auto* p : {&a.A, &a.E, &a.B}) p->mutable_grad().zero_();
  one_step(a, opt, x);
  REQUIRE(state_of(opt, a.E).exp_avg().size(0) == 2);
  REQUIRE(state_of(opt, a.A).step() == 2);
}

TEST_CASE("a rank-0 adapter is tensors with a zero dimension that still train", "[compaction]") {
  torch::manual_seed(2);
  adapted_linear a = make_adapter(5, 4, 3, 12);
  torch::optim::AdamW opt(std::vector<torch::Tensor>{a.A, a.E, a.B}, torch::optim::AdamWOptions(1e-2));
  const torch::Tensor x = torch::randn({6, 4});
  one_step(a, opt, x);
  compact_adapter(a, adalora::triplet_map::keeping(std::vector<bool>{false, false, false}), opt);
  REQUIRE(a.A.sizes() == torch::IntArrayRef({0, 4}));
  REQUIRE(a.E.sizes() == torch::IntArrayRef({0, 1}));
  REQUIRE(a.B.sizes() == torch::IntArrayRef({5, 0}));
  // No triplet: the layer is its base.
  REQUIRE(torch::equal(a.forward(x), torch::linear(x, a.W, a.b)));
  REQUIRE_NOTHROW(one_step(a, opt, x));
  REQUIRE(state_of(opt, a.B).exp_avg().sizes() == torch::IntArrayRef({5, 0}));
  // The library views it and the regularizer sees nothing to penalise.
  adalora::adapter_set<float> set;
  REQUIRE_NOTHROW(adalora::add_torch_adapter(set, a.name, a.A, a.E, a.B));
  REQUIRE(set.total_rank() == 0);
  adalora::orthogonality_regularizer<float> orth({.weight = 0.1});
  REQUIRE(orth.value_and_gradient(set) == 0.0);
}

TEST_CASE("compact_adapter refuses a map of another rank and an optimizer without moments", "[compaction]") {
  adapted_linear a = make_adapter(5, 4, 3, 13);
  torch::optim::AdamW adamw(std::vector<torch::Tensor>{a.A, a.E, a.B});
  REQUIRE_THROWS_WITH(compact_adapter(a, adalora::triplet_map::keeping(std::vector<bool>{true, true}), adamw),
                    Catch::Contains("old rank must be the adapter's rank 3, got 2"));
  adalora::triplet_map backwards{3, {2, 0}};
  REQUIRE_THROWS_WITH(compact_adapter(a, backwards, adamw), Catch::Contains("increasing order"));
  REQUIRE(a.A.size(0) == 3);  // nothing moved
  torch::optim::SGD sgd(std::vector<torch::Tensor>{a.A, a.E, a.B}, torch::optim::SGDOptions(0.1).momentum(0.9));
  one_step(a, sgd, torch::randn({2, 4}));
  REQUIRE_THROWS_WITH(compact_adapter(a, adalora::triplet_map::keeping(std::vector<bool>{true, false, true}), sgd),
                    Catch::Contains("Adam's or AdamW's"));
}

TEST_CASE("training after compaction follows masked training (orthogonality off)", "[compaction]") {
  // Two identical models of two adapters each, the same batches and schedule; one compacts when
  // the pattern is final, the other keeps masking. torch's products at another rank may sum in
  // another order: equal up to rounding.
  struct run {
    std::vector<adapted_linear> layers;
    std::unique_ptr<torch::optim::AdamW> opt;
    adalora::adapter_set<float> set;
    std::unique_ptr<adalora::rank_allocator<float>> allocator;
    std::vector<adapted_linear*> adapted() { return {&layers[0], &layers[1]}; }
    torch::Tensor forward(const torch::Tensor& x) const { return layers[1].forward(torch::tanh(layers[0].forward(x))); }
  };
  const std::int64_t steps = 40;
  const auto make = [&](run& r) {
    r.layers.push_back(make_adapter(8, 6, 4, 21, "l0"));
    r.layers.push_back(make_adapter(5, 8, 4, 22, "l1"));
    std::vector<torch::Tensor> params;
    for (auto* a : r.adapted()) {
      for (auto& p : a->adapter_parameters()) params.push_back(p);
      adalora::add_torch_adapter(r.set, a->name, a->A, a->E, a->B);
    }
    r.opt = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-2));
    r.allocator = std::make_unique<adalora::rank_allocator<float>>(
        r.set, adalora::cubic_schedule({.target_budget = 3, .total_step = steps, .tinit = 4, .tfinal = 12, .delta_t = 2}));
  };
  run masked, compacted;
  make(masked);
  make(compacted);
  torch::Generator gen = torch::make_generator<torch::CPUGeneratorImpl>(5);
  const torch::Tensor M = torch::randn({6, 5}, gen);
  std::int64_t compacted_at = -1;
  for (std::int64_t t = 0; t < steps; ++t) {
    const torch::Tensor x = torch::randn({16, 6}, gen);
    for (run* r : {&masked, &compacted}) {
      (r->forward(x) - torch::matmul(x, M)).pow(2).mean().backward();
      r->opt->step();
      r->allocator->step(t, r->set);
      if (r == &compacted && compacted_at < 0 && r->allocator->pattern_final()) {
        compact_adapters(r->adapted(), *r->allocator, r->set, *r->opt);
        compacted_at = t;
      }
      for (auto* a : r->adapted())
        for (auto* p : {&a->A, &a->E, &a->B}) p->mutable_grad().zero_();
    }
  }
  REQUIRE(compacted_at == steps - 12);  // PEFT's force mask at T − tfinal
  const auto& kept = masked.allocator->last_result().kept;
  for (std::size_t i = 0; i < 2; ++i) REQUIRE(compacted.layers[i].A.size(0) == std::int64_t(kept[i]));
  REQUIRE(compacted.layers[0].A.size(0) + compacted.layers[1].A.size(0) <= 3);
  REQUIRE(compacted.allocator->total_rank() == compacted.layers[0].A.size(0) + compacted.layers[1].A.size(0));
  const torch::Tensor x = torch::randn({32, 6}, gen);
  const torch::Tensor a = masked.forward(x).detach(), b = compacted.forward(x).detach();
  REQUIRE((a - b).abs().max().item<double>() <= 1e-5 * std::max(1.0, a.abs().max().item<double>()));
}
