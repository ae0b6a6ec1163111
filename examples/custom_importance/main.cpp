// A custom importance metric plugged into the rank allocator: Fisher saliency w²·EMA(g²)
// (fisher_importance.hpp).
//
// 1. Quality: next to AdaLoRA's own smoothed sensitivity, on the testing kit's planted-rank
//    problem: six adapters whose true updates have ranks {4, 0, 1, 3, 0, 2}, trained from rank 6
//    each (b0 = 36) down to a total of 10. A good metric keeps exactly the planted ranks.
// 2. Use and speed: the metric in a training loop's allocator, on adapters of the DeBERTaV3-base
//    shape (72 adapters, r = 12, 2M parameters): an adapter_set of the adapters, a
//    rank_allocator<float, fisher_importance> over it, allocator.step(t, set) after each
//    optimizer step. Timed with the metric's block hook (update_block) and without it (the same
//    metric behind a type without the hook): the same masks, at different speeds.
//
//   bazel run -c opt --copt=-march=x86-64-v3 //examples/custom_importance --
//       [--seed N] [--beta B] [--speed-steps N]        (one command line)
// (the metric's block hook is vector code for AVX: without -march=x86-64-v3, or -mavx2, it is
// left out and both timings are of the allocator's generic loop).
//
// With your own metric: replace example::fisher_importance below by it, and copy
// fisher_importance_test.cpp for its unit test.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "adalora/adalora.hpp"
#include "adalora/testing/planted_rank.hpp"
#include "examples/custom_importance/fisher_importance.hpp"

namespace {

/// fisher_importance without its block hook: the allocator runs it through its generic loop.
struct fisher_without_hook {
  static constexpr std::size_t state_size = example::fisher_importance::state_size;
  example::fisher_importance inner;

  template <class T>
  T update(adalora::tensor_role role, T param, T grad, std::span<T, state_size> state) const noexcept {
    return inner.update(role, param, grad, state);
  }
  template <class T>
  T score(adalora::tensor_role role, T param, std::span<const T, state_size> state) const noexcept {
    return inner.score(role, param, state);
  }
};

/// The adapters of DeBERTaV3-base (q, k, v, o: 768 × 768; the FFN: 768 ↔ 3072; 12 layers) at
/// rank 12, with the views a training loop would hand the allocator.
struct model {
  std::vector<adalora::svd_adapter<float>> adapters;
  adalora::adapter_set<float> set;

  explicit model(std::mt19937_64& rng) {
    struct weight {
      const char* name;
      adalora::index_t in, out;
    };
    const weight weights[] = {{"query", 768, 768},      {"key", 768, 768},
                              {"value", 768, 768},      {"attention.output", 768, 768},
                              {"intermediate", 768, 3072}, {"output", 3072, 768}};
    std::vector<std::string> names;
    for (int layer = 0; layer < 12; ++layer)
      for (const weight& w : weights) {
        adapters.emplace_back(w.in, w.out, 12, /*alpha=*/12.0);
        adapters.back().initialize(rng);
        names.push_back("layer." + std::to_string(layer) + "." + w.name);
      }
    // Added once the vector no longer grows (an svd_adapter's tensors stay put when it moves,
    // but adding after the last emplace_back keeps that question away).
    for (std::size_t a = 0; a < adapters.size(); ++a) set.add(names[a], adapters[a]);
  }

  /// Gradients of a training step (any values do for timing; these are of a model in training).
  void fake_gradients(std::mt19937_64& rng) {
    std::normal_distribution<float> g(0.0f, 1e-3f);
    for (auto& a : adapters) {
      const auto grads = a.grads();
      for (adalora::index_t i = 0; i < grads.A.size(); ++i) grads.A.data()[i] = g(rng);
      for (adalora::index_t i = 0; i < grads.E.size(); ++i) grads.E.data()[i] = g(rng);
      for (adalora::index_t i = 0; i < grads.B.size(); ++i) grads.B.data()[i] = g(rng);
    }
  }
};

/// `steps` allocator steps with metric M on the model, masking every step to half the budget:
/// the median milliseconds per step, and the kept masks of the last step.
template <class M>
double time_steps(model& m, const M& metric, std::int64_t steps, std::vector<std::uint8_t>& kept) {
  // The schedule's initial budget is left to the allocator (the sum of the adapters' ranks).
  adalora::rank_allocator<float, M> allocator(
      m.set, adalora::cubic_schedule({.target_budget = m.set.total_rank() / 2,
                                      .total_step = 1'000'000,
                                      .tinit = 0,
                                      .tfinal = 0,
                                      .delta_t = 1}),
      metric);
  std::mt19937_64 rng(11);  // the same gradients for every metric
  std::vector<double> ms;
  for (std::int64_t t = 0; t < steps; ++t) {
    m.fake_gradients(rng);  // stands for backward() and the optimizer step
    const auto start = std::chrono::steady_clock::now();
    allocator.step(t, m.set);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  kept.clear();
  for (std::size_t a = 0; a < allocator.num_adapters(); ++a) {
    const auto mask = allocator.kept_mask(a);
    kept.insert(kept.end(), mask.begin(), mask.end());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  adalora::testing::planted_rank_options problem;  // the kit's defaults: 300 Adam steps
  example::fisher_importance::options fisher;
  std::int64_t speed_steps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--seed") == 0) {
      problem.seed = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (std::strcmp(argv[i], "--beta") == 0) {
      fisher.beta = std::strtod(argv[i + 1], nullptr);
    } else if (std::strcmp(argv[i], "--speed-steps") == 0) {
      speed_steps = std::strtoll(argv[i + 1], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--seed N] [--beta B] [--speed-steps N]\n", argv[0]);
      return 2;
    }
  }

  // 1. The metric is the allocator's second template argument; run_planted_rank_problem builds
  // rank_allocator<float, fisher_importance> and calls step() after every optimizer step.
  const auto ours = adalora::testing::run_planted_rank_problem<float>(
      example::fisher_importance(fisher), problem);
  const auto baseline =
      adalora::testing::run_planted_rank_problem<float>(adalora::smoothed_sensitivity{}, problem);

  std::cout << "fisher_importance (beta " << fisher.beta << "): " << ours
            << "\nsmoothed_sensitivity (AdaLoRA): " << baseline << '\n';
  if (ours.exact)
    std::cout << "fisher_importance kept exactly the planted ranks\n";
  else
    std::cout << "fisher_importance recovered " << ours.overlap * 100 << "% of the planted rank\n";

  // 2. In a training loop, and how much the block hook saves there.
  if (speed_steps > 0) {
    std::mt19937_64 rng(3);
    model m(rng);
    std::vector<std::uint8_t> kept_hook, kept_plain;
    const double with_hook = time_steps(m, example::fisher_importance(fisher), speed_steps, kept_hook);
    const double without = time_steps(m, fisher_without_hook{example::fisher_importance(fisher)},
                                      speed_steps, kept_plain);
    constexpr bool hook = adalora::detail::has_update_block<example::fisher_importance, float>;
    std::printf("\nallocator step on %zu adapters (%lld triplets), median of %lld steps:\n"
                "  fisher_importance%s %.2f ms\n"
                "  the same metric without the hook         %.2f ms  (%.2fx)\n"
                "  same masks: %s\n",
                m.set.size(), static_cast<long long>(m.set.total_rank()),
                static_cast<long long>(speed_steps),
                hook ? " with its block hook   " : " (hook not built: no AVX)", with_hook, without,
                without / with_hook, kept_hook == kept_plain ? "yes" : "NO");
    if (kept_hook != kept_plain) return 1;
  }
  return 0;
}
